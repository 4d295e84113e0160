# Quick start: `make main` runs the main job, `make test` runs lint, type checks, the docs build
# and the tests.
# Both create .venv and install the project (and Fashion-MNIST where apt-get is available) first.
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# torch 2.13.0: a CPU wheel of it lies on this project's machines; elsewhere pip fetches it.
TORCH ?= torch==2.13.0

.PHONY: install data main test test-slow bench docs docs-serve

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

# The headline at the converged CPU scale (15 runs, about 1,000 CPU-seconds); the command prints
# its wall and CPU time at the end.
main: install data
	$(VENV)/bin/eigensam reproduce headline --scale cpu --jobs 2 --out runs/main

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir site
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# The API reference site (MkDocs + mkdocstrings) in site/; warnings are errors.
docs: install
	$(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: install
	$(VENV)/bin/mkdocs serve

test-slow: install data
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow

bench: install data
	$(VENV)/bin/pip install -q -e ".[bench]"
	$(PY) benchmarks/bench_optimizers.py
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) benchmarks/bench_optimizers.py --device cuda; \
	fi
