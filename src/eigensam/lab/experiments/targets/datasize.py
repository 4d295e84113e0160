"""Data size: does SAM − SGD (twice the epochs) change sign with the amount of training data?
The converged CPU scale trains on 1,024 Fashion-MNIST images; this target trains SGD and SAM on
4,096 (same width, epochs and schedule: four times the steps) and compares the held-out gaps at
both sizes. The paper's Fashion-MNIST figure (+0.5, all 60,000 images) is closer to the larger
subset, so that comparison is judged against it; the 1,024-image comparison is the decide
target's."""

from __future__ import annotations

from pathlib import Path

from eigensam.lab.experiments.claims import POINTS, Compare, Paper, judge
from eigensam.lab.experiments.common import Plan, Results, Target, command, seeds_plan
from eigensam.lab.experiments.convergence import CONVERGED_TRAIN_ACC, converged_results
from eigensam.lab.experiments.report import Section, fmt
from eigensam.lab.experiments.runs import Scale

SIZES = (1024, 4096)
LARGE = 4096
SPECS = (
    Compare(
        f"SAM has a higher held-out accuracy than SGD (2× epochs) on {LARGE:,} images",
        f"sam n={LARGE}",
        f"sgd n={LARGE}",
        "held_out_acc",
        +1,
        Paper(0.5, "ResNet-18, Fashion-MNIST (60,000 images), Table 1", "95.4 vs 94.9"),
        **POINTS,
    ),
)


def plan(scale: Scale) -> Plan:
    """SGD (2× epochs) and SAM at both subset sizes, every seed (the 1,024-image runs are the
    headline's)."""
    if scale.name != "cpu":
        raise ValueError("the data-size target runs at CPU scale only")
    epochs = scale.base["epochs"]
    return seeds_plan(
        scale,
        {
            f"{m} n={n}": {
                "method": m,
                "train_subset": n,
                "epochs": 2 * epochs if m == "sgd" else epochs,
            }
            for n in SIZES
            for m in ("sgd", "sam")
        },
    )


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    results = converged_results(plan, scale.note, out / "datasize.json")
    header = (
        "| training images | SAM − SGD held-out (points) | SAM − SGD test (points) | lowest "
        "train acc (%) | seeds |\n|---|---|---|---|---|\n"
    )
    table = header + "\n".join(_gap_row(results, n) for n in SIZES)
    body = (
        f"{scale.note}, and the same recipe on a seeded {LARGE:,}-image subset. SAM − SGD per "
        f"size: mean ± 95% CI of the paired differences over seeds. Convergence criterion: "
        f"train accuracy ≥ {100 * CONVERGED_TRAIN_ACC:.0f}%. The {SIZES[0]:,}-image comparison "
        "is judged by the decide target (more seeds).\n\n" + table + "\n" + results.failure_note()
    )
    title = "Data size: SAM − SGD on 1,024 and 4,096 training images"
    claims = judge(SPECS, results)
    return Section("datasize", title, command("datasize", scale), body, [], claims)


def _gap_row(results: Results, n: int) -> str:
    """SAM − SGD at ``n`` training images: held-out and test differences, lowest train fit."""
    held = results.paired(f"sam n={n}", f"sgd n={n}", "held_out_acc")
    test = results.paired(f"sam n={n}", f"sgd n={n}", "test_acc")
    fits = [v for m in ("sam", "sgd") for v in results.values(f"{m} n={n}", "train_fit_acc")]
    return (
        f"| {n:,} | {fmt([a - b for a, b in zip(*held, strict=True)], 2, 100)} | "
        f"{fmt([a - b for a, b in zip(*test, strict=True)], 2, 100)} | "
        f"{f'{100 * min(fits):.2f}' if fits else '–'} | {len(held[0])} |"
    )


TARGET = Target("datasize", "Data size", plan, analyze, held_out=True, specs=SPECS)
