"""What each eigenvector estimator costs: Eigen-SAM's step time over SAM's, per estimator.

The tracking study's estimators (:data:`eigensam.lab.experiments.targets.tracking.ESTIMATORS`,
each a rule of :mod:`eigensam.hessian.estimators` with its interval and products) drive
Eigen-SAM (α = 0.2, ``opt.step(closure, batch=(x, y))``: eval-mode exact products,
``hessian_parts="auto"``) on the headline's SimpleCNN (quarter width) or the small ViT (half
width), batch 128 of Fashion-MNIST. All optimizers start from the same weights and take
``--steps`` steps (default 100: a whole period of every rule) round robin, step ``t`` of every
optimizer in turn, each timed in CPU seconds of this process (one thread), so that load from
other jobs hits all alike; the ratio is an estimator's total over SAM's in the same run
(:func:`eigensam.lab.experiments.tracking_study.step_time_ratios`, which ``eigensam reproduce
tracking`` uses too). Printed as a Markdown table and written to
``benchmarks/results/estimators-<model>.json``.

Run (about 4 minutes for the SimpleCNN on one core):

    python benchmarks/bench_estimators.py [--model simplecnn|vit-small] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from eigensam.lab.experiments.runs import make_scale
from eigensam.lab.experiments.targets.tracking import ESTIMATORS, MODELS, measure_timing

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="simplecnn")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale = make_scale("cpu", RESULTS)
    ratios = measure_timing(scale, args.model, args.steps)
    print(
        f"{args.model}: Eigen-SAM step time over SAM's per estimator, {args.steps} steps round "
        f"robin, CPU seconds of one thread (SAM: {1000 * ratios['sam']:.1f} ms/step)\n"
    )
    print("| estimator | nominal products per 100 steps | step time / SAM |\n|---|---|---|")
    for label in ESTIMATORS:
        name, interval, iters, _ = ESTIMATORS[label]
        products = 0.0 if name == "secant-only" else 100 * iters / interval
        print(f"| {label} | {products:.1f} | {ratios[label]:.3f} |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"estimators-{args.model}.json"
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    out.write_text(json.dumps({**machine, "steps": args.steps, "ratios": ratios}, indent=1) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
