"""The pilot measurement that chooses the converged CPU scale.

Each candidate setting trains plain SGD (momentum 0.9, cosine schedule to 0) on a Fashion-MNIST
subset and records what the choice needs: the final train accuracy on the whole (unaugmented)
training subset, which must reach :data:`~eigensam.lab.experiments.convergence.CONVERGED_TRAIN_ACC`,
the test accuracy, and the process's CPU seconds (``time.process_time``, all threads), which set
the budget of ``make main`` independently of how busy the machine is.

Run it one setting at a time, on one thread::

    OMP_NUM_THREADS=1 python -m eigensam.lab.experiments.pilot --out runs/pilot \\
        --subset 2048 --epochs 15 --width 0.5 --no-augment

``--finetune-from RUN --steps N`` instead fine-tunes table2's pretrained ViT on the digits.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.config import config_from_dict
from eigensam.lab.engine.train import Trainer
from eigensam.lab.experiments.convergence import converged, train_fit
from eigensam.lab.experiments.runs import CPU_BASE

PILOT_FILE = "pilot.jsonl"


def pilot_config(
    out: Path, subset: int, epochs: int, width: float, augment: bool, method: str = "sgd"
) -> dict[str, Any]:
    """The configuration of one pilot run: the CPU scale's base recipe (He initialization,
    lr 0.03, batch 128, cosine to 0) at the given size, without sharpness tracking."""
    fields = {
        **CPU_BASE,
        "method": method,
        "train_subset": subset,
        "epochs": epochs,
        "width": width,
        "augment": augment,
        "track_every": 0,
        "track_batches": 0,
        "snapshot_epochs": [],
        "eval_every": epochs,
        "seed": 0,
    }
    name = f"{method}-n{subset}-e{epochs}-w{width}-{'aug' if augment else 'noaug'}"
    return {**fields, "out_dir": str(out / name)}


def run_pilot(
    out: Path, subset: int, epochs: int, width: float, augment: bool, method: str = "sgd"
) -> dict[str, Any]:
    """Train one pilot setting and append its measurement to ``<out>/pilot.jsonl``."""
    config = config_from_dict(pilot_config(out, subset, epochs, width, augment, method))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    summary = Trainer(config).run()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    fit = train_fit(config)
    record = {
        "kind": "pilot",
        "method": method,
        "subset": subset,
        "epochs": epochs,
        "width": width,
        "augment": augment,
        "steps": summary["steps"],
        "train_acc": fit["train_fit_acc"],
        "train_loss": fit["train_fit_loss"],
        "test_acc": summary["test_acc"],
        "converged": converged(fit["train_fit_acc"]),
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "threads": torch.get_num_threads(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
    }
    tracking.append_record(out / PILOT_FILE, record)
    return record


def run_finetune_pilot(
    out: Path, pretrained: Path, steps: int, method: str = "sgd"
) -> dict[str, Any]:
    """Fine-tune table2's pretrained ViT (run folder ``pretrained``) on the digits for ``steps``
    steps (seed 0) and append the train/test accuracy and CPU seconds to ``<out>/pilot.jsonl``:
    the measurement that sets table2's N."""
    from eigensam.lab.engine.trained_model import load_trained
    from eigensam.lab.experiments.targets.finetune import Finetune, finetune, load_digits

    model, data = load_trained(pretrained).model, load_digits()
    cpu0 = time.process_time()
    result = finetune(model, data, Finetune(method, 0, steps))
    record = {
        "kind": "finetune-pilot",
        "method": method,
        "steps": steps,
        "train_acc": result["train_acc"],
        "test_acc": result["test_acc"],
        "cpu_seconds": time.process_time() - cpu0,
    }
    out.mkdir(parents=True, exist_ok=True)
    tracking.append_record(out / PILOT_FILE, record)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pilot"))
    parser.add_argument("--subset", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--method", default="sgd")
    parser.add_argument(
        "--finetune-from", type=Path, help="table2's pretraining run: fine-tune it instead"
    )
    parser.add_argument("--steps", type=int, help="fine-tuning steps (with --finetune-from)")
    args = parser.parse_args(argv)
    if args.finetune_from is not None:
        if args.steps is None:
            parser.error("--finetune-from needs --steps")
        record = run_finetune_pilot(args.out, args.finetune_from, args.steps, args.method)
    else:
        if args.subset is None or args.epochs is None:
            parser.error("--subset and --epochs are required (or --finetune-from and --steps)")
        record = run_pilot(
            args.out, args.subset, args.epochs, args.width, args.augment, args.method
        )
    print(
        " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
