"""Table 1 (paper §6.2, Appendix E): test accuracy of SGD (twice the epochs: equal compute),
SAM, Eigen-SAM (α = 0.2), X-SAM and ASAM, mean ± 95% CI over seeds, with paired tests."""

from __future__ import annotations

import itertools
from pathlib import Path

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.experiments.claims import POINTS, Compare, Paper, judge
from eigensam.lab.experiments.common import Plan, Results, Target, command, seeds_plan
from eigensam.lab.experiments.convergence import add_final_fits
from eigensam.lab.experiments.report import Section, fmt
from eigensam.lab.experiments.runs import Scale

METHODS = ("sgd", "sam", "eigen-sam", "x-sam", "asam")
PAPER_FILES = tuple(
    f"{model}-{data}"
    for model, data in itertools.product(
        ("resnet18", "resnet50", "wrn28-10"), ("cifar10", "cifar100", "fashion-mnist", "svhn")
    )
)
# Paper Table 1, ResNet-18 on Fashion-MNIST: the row closest to the CPU scale.
PAPER_FMNIST = {"sgd": 94.9, "sam": 95.4, "eigen-sam": 95.6}


SPECS = (
    Compare(
        "X-SAM has a higher held-out accuracy than SAM",
        "x-sam",
        "sam",
        "held_out_acc",
        +1,
        Paper(None, "X-SAM paper", "better generalization"),
        **POINTS,
    ),
)


def _fields(method: str, epochs: int) -> dict[str, object]:
    return {"method": method, "epochs": 2 * epochs if method == "sgd" else epochs}


def plan(scale: Scale) -> Plan:
    """Every method and seed; SGD trains twice the epochs (Appendix E). Paper scale: the twelve
    model-dataset configurations in configs/."""
    if scale.name == "cpu":
        epochs = scale.base["epochs"]
        return seeds_plan(scale, {m: _fields(m, epochs) for m in METHODS})
    plans: Plan = {}
    for file in PAPER_FILES:
        sub = seeds_plan(scale, {m: _fields(m, 200) for m in METHODS}, file=file)
        plans.update({f"{file}/{m}": runs for m, runs in sub.items()})
    return plans


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    results = Results.load(plan)
    if scale.name == "cpu":
        add_final_fits(plan, results)
    rows = [
        "| runs | method | epochs | train acc (%) | test acc (%) | held-out acc (%) | final λ₁ "
        "| train s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, configs in plan.items():
        rows.append(
            f"| {len(results.summaries[label])} | {label} | {configs[0].epochs} | "
            f"{fmt(results.values(label, 'train_fit_acc'), 2, 100)} | "
            f"{fmt(results.values(label, 'test_acc'), 2, 100)} | "
            f"{fmt(results.values(label, 'held_out_acc'), 2, 100)} | "
            f"{fmt(results.values(label, 'final_lambda1'), 2)} | "
            f"{fmt(results.values(label, 'train_seconds_per_step'), 4)} |"
        )
    tracking.write_json(out / "table1.json", {"scale": scale.note, **results.summaries})
    body = (
        f"{scale.note}. Mean ± 95% CI over seeds; SGD trains twice the epochs (equal compute, "
        "Appendix E).\n\n" + "\n".join(rows) + "\n" + results.failure_note()
    )
    # SAM − SGD and Eigen-SAM − SAM are the decide target's claims (same runs).
    claims = judge(SPECS, results) if scale.name == "cpu" else []
    return Section("table1", "Table 1: test accuracy", command("table1", scale), body, [], claims)


TARGET = Target(
    "table1",
    "Table 1: test accuracy",
    plan,
    analyze,
    min_seeds=2,
    held_out=True,
    specs=SPECS,
)
