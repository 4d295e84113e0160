"""The pilot measurement that chooses the converged CPU scale.

Each candidate setting trains plain SGD (momentum 0.9, cosine schedule to 0) on a Fashion-MNIST
subset and records what the choice needs: the final train accuracy on the whole (unaugmented)
training subset, which must reach :data:`~eigensam.lab.experiments.convergence.CONVERGED_TRAIN_ACC`,
the test accuracy, and the process's CPU seconds (``time.process_time``, all threads), which set
the budget of ``make main`` independently of how busy the machine is.

Run it one setting at a time, on one thread::

    OMP_NUM_THREADS=1 python -m eigensam.lab.experiments.pilot --out runs/pilot \\
        --subset 2048 --epochs 15 --width 0.5 --no-augment

``--finetune-from RUN --steps 1200,1800 --method sam,eigen-sam`` instead fine-tunes table2's
pretrained ViT on the digits at each candidate N and prints the N that
:func:`choose_finetune_steps` picks: the smallest at which SAM and Eigen-SAM (not only SGD at
2N) reach 99% train accuracy. With ``--out`` = table2's folder (``runs/reproduce-cpu/table2``)
table2 reuses those seed-0 fine-tunings and its section shows the pilot.
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
    the measurement that sets table2's N. The fine-tuning is cached as table2 caches its own
    (``<out>/finetune``), so with ``out`` = table2's folder (``<reproduce out>/table2``) the
    target reuses seed 0's fine-tunings at the N chosen, and table2's section shows the pilot."""
    from eigensam.lab.engine.trained_model import load_trained
    from eigensam.lab.experiments.targets.finetune import Finetune, cached_finetune, load_digits

    model, data = load_trained(pretrained).model, load_digits()
    result = cached_finetune(model, data, Finetune(method, 0, steps), out / "finetune")
    record = {
        "kind": "finetune-pilot",
        "method": method,
        "steps": steps,
        "train_acc": result["train_acc"],
        "test_acc": result["test_acc"],
        "cpu_seconds": result["cpu_seconds"],
    }
    out.mkdir(parents=True, exist_ok=True)
    tracking.append_record(out / PILOT_FILE, record)
    return record


def choose_finetune_steps(
    records: Sequence[dict[str, Any]], methods: Sequence[str] = ("sam", "eigen-sam")
) -> int | None:
    """Table 2's N by the pilot rule: the smallest number of fine-tuning steps at which every
    one of ``methods`` (the two-pass methods, which train N steps while SGD trains 2N) reached
    :data:`~eigensam.lab.experiments.convergence.CONVERGED_TRAIN_ACC` in the
    ``finetune-pilot`` ``records``; None when no measured N does."""
    pilots = [r for r in records if r.get("kind") == "finetune-pilot"]
    by_steps: dict[int, dict[str, float]] = {}
    for r in pilots:
        by_steps.setdefault(int(r["steps"]), {})[r["method"]] = float(r["train_acc"])
    met = [
        steps
        for steps, accs in by_steps.items()
        if all(m in accs and converged(accs[m]) for m in methods)
    ]
    return min(met) if met else None


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
    parser.add_argument(
        "--steps",
        help="fine-tuning steps, comma-separated candidates of N (with --finetune-from; "
        "--method may then list methods, e.g. sam,eigen-sam)",
    )
    args = parser.parse_args(argv)
    if args.finetune_from is not None:
        if args.steps is None:
            parser.error("--finetune-from needs --steps")
        for steps in (int(s) for s in args.steps.split(",")):
            for method in args.method.split(","):
                record = run_finetune_pilot(args.out, args.finetune_from, steps, method)
                print(" ".join(f"{k}={v}" for k, v in record.items()), flush=True)
        chosen = choose_finetune_steps(tracking.read_records(args.out / PILOT_FILE))
        print(f"N for table2 (SAM and Eigen-SAM >= 99% train accuracy): {chosen}")
        return 0
    if args.subset is None or args.epochs is None:
        parser.error("--subset and --epochs are required (or --finetune-from and --steps)")
    record = run_pilot(args.out, args.subset, args.epochs, args.width, args.augment, args.method)
    print(
        " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
