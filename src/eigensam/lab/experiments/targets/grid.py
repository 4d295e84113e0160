"""Open check (b) of the paper's summary: hyperparameter sensitivity. Does Eigen-SAM's gain over
SAM, if any, hold across a learning rate × weight decay grid? SAM and Eigen-SAM (α = 0.2) at
every cell of the grid on the converged CPU scale; the base cell is Table 1's runs (every seed),
the others use the sweep seeds. One paired claim per cell, judged by the three-way rules."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.experiments.claims import POINTS, Compare, Paper, judge
from eigensam.lab.experiments.common import Plan, Results, Target, command, sweep_plan
from eigensam.lab.experiments.convergence import add_final_fits
from eigensam.lab.experiments.report import Section, fmt
from eigensam.lab.experiments.runs import CPU_BASE, Scale

LRS = (0.01, 0.03)  # the SimpleCNN (no normalization) diverges at the paper's 0.1
WEIGHT_DECAYS = (5e-5, 5e-4)  # the paper's two values (CIFAR runs use 5e-4)
METHODS = ("sam", "eigen-sam")
# Off-base cells need only the end of training: sharpness at the first step and at the end.
LIGHT = {"track_every": 100_000}
PAPER_EFFECT = 0.2  # Eigen-SAM − SAM, points (Table 1, ResNet-18 on Fashion-MNIST)


def cell_label(method: str, lr: float, weight_decay: float) -> str:
    return f"{method} lr={lr:g} wd={weight_decay:g}"


def grid_groups(base: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """The plan's groups, one per (method, lr, weight decay), and the labels of the base cell
    (the scale's own lr and weight decay: Table 1's runs, shared)."""
    groups: dict[str, dict[str, Any]] = {}
    shared = set()
    for method, lr, wd in itertools.product(METHODS, LRS, WEIGHT_DECAYS):
        label = cell_label(method, lr, wd)
        at_base = lr == base.get("lr") and wd == base.get("weight_decay")
        fields: dict[str, Any] = {"method": method}
        if not at_base:
            fields.update(lr=lr, weight_decay=wd, **LIGHT)
        else:
            shared.add(label)
        groups[label] = fields
    return groups, shared


def plan(scale: Scale) -> Plan:
    """SAM and Eigen-SAM at every (lr, weight decay) of the grid (CPU scale only)."""
    if scale.name != "cpu":
        raise ValueError("the lr × weight decay grid runs at CPU scale only")
    groups, shared = grid_groups(scale.base)
    return sweep_plan(scale, groups, shared)


def specs(base: dict[str, Any]) -> tuple[Compare, ...]:
    """One claim per cell: Eigen-SAM beats SAM in held-out accuracy. The base cell is the
    decide target's comparison (same runs): there its power only."""
    paper = Paper(PAPER_EFFECT, "ResNet-18, Fashion-MNIST, Table 1 (open check: elsewhere?)")
    return tuple(
        Compare(
            f"Eigen-SAM beats SAM in held-out accuracy at lr {lr:g}, weight decay {wd:g}",
            cell_label("eigen-sam", lr, wd),
            cell_label("sam", lr, wd),
            "held_out_acc",
            +1,
            paper,
            decided_by="decide" if (lr, wd) == (base.get("lr"), base.get("weight_decay")) else None,
            **POINTS,
        )
        for lr, wd in itertools.product(LRS, WEIGHT_DECAYS)
    )


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    results = Results.load(plan)
    add_final_fits(plan, results, fit=False)
    rows = [
        "| lr | weight decay | SAM test acc (%) | Eigen-SAM test acc (%) | SAM held-out acc (%) "
        "| Eigen-SAM held-out acc (%) | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for lr, wd in itertools.product(LRS, WEIGHT_DECAYS):
        sam, eig = cell_label("sam", lr, wd), cell_label("eigen-sam", lr, wd)
        cells = [
            fmt(results.values(label, key), 2, 100)
            for key in ("test_acc", "held_out_acc")
            for label in (sam, eig)
        ]
        rows.append(
            f"| {lr:g} | {wd:g} | {' | '.join(cells)} | "
            f"{len(results.summaries[sam])}/{len(results.summaries[eig])} |"
        )
    tracking.write_json(out / "grid.json", {"scale": scale.note, **results.summaries})
    body = (
        f"{scale.note}. SAM and Eigen-SAM (α = 0.2) at every learning rate × weight decay; the "
        f"cell lr {scale.base.get('lr')}, weight decay {scale.base.get('weight_decay')} is "
        "Table 1's runs (every seed), the others use the sweep seeds. Mean ± 95% CI over "
        "seeds.\n\n" + "\n".join(rows) + "\n" + results.failure_note()
    )
    title = "Open check (b): learning rate × weight decay"
    claims = judge(specs(scale.base), results)
    return Section("grid", title, command("grid", scale), body, [], claims)


TARGET = Target(
    "grid",
    "Open check (b): lr × weight decay grid",
    plan,
    analyze,
    held_out=True,
    specs=specs(dict(CPU_BASE)),
)
