# Quick start: `make main` runs the main job, `make test` runs lint and the tests.
# Both create .venv and install the project (and Fashion-MNIST where apt-get is available) first.
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# torch 2.13.0: a CPU wheel of it lies on this project's machines; elsewhere pip fetches it.
TORCH ?= torch==2.13.0

.PHONY: install data main test test-slow bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

data:
	@if [ ! -f $(FASHION) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	fi

main: install data
	$(VENV)/bin/eigensam compare --dataset fashion-mnist --model simplecnn \
		--methods sgd,sam,eigen-sam,x-sam --seeds 1 --epochs 10 --train-subset 10000 \
		--batch-size 128 --width 0.5 --lr 0.03 --out runs/main

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-slow: install data
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow

bench: install data
	$(VENV)/bin/pip install -q -e ".[bench]"
	$(PY) benchmarks/bench_optimizers.py
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) benchmarks/bench_optimizers.py --device cuda; \
	fi
