"""Tables 3-4 (paper Appendix F): Eigen-SAM with refresh interval p against SAM, accuracy and
measured wall-time overhead; and eigensam's ``eig_schedule="spread"`` (the q products of an
interval spread over it, one every p/q steps) against the paper's burst at the same products."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.experiments.claims import POINTS, Compare, Paper, Spec, Untestable, judge
from eigensam.lab.experiments.common import Plan, Results, Target, command, sweep_plan
from eigensam.lab.experiments.convergence import add_final_fits
from eigensam.lab.experiments.report import Section, fmt
from eigensam.lab.experiments.runs import Scale
from eigensam.lab.experiments.targets.fig1 import run_mean

CPU_PS = (10, 20, 50, 100)  # the paper's 100-1000 scaled to a CPU run of a few hundred steps
PAPER_PS = (100, 200, 500, 1000)
# Runs other than table1's: the optimizer's estimate is compared with v₁ at each measurement.
TRACKED = {"track_batches": 0, "snapshot_epochs": []}


def _groups(scale: Scale) -> dict[str, dict[str, Any]]:
    ps = CPU_PS if scale.name == "cpu" else PAPER_PS
    default = scale.base.get("eig_interval", 100)
    groups: dict[str, dict[str, Any]] = {"SAM": {"method": "sam"}}
    for p in ps:
        fields: dict[str, Any] = {"method": "eigen-sam"}
        if p != default:
            fields.update(eig_interval=p, **TRACKED)
        groups[f"p={p} burst"] = fields
    # The spread schedule at the default p: the same products per interval as burst.
    groups[f"p={default} spread"] = {"method": "eigen-sam", "eig_schedule": "spread", **TRACKED}
    return groups


def plan(scale: Scale) -> Plan:
    """SAM, Eigen-SAM at every p (burst) and at the default p (spread), every seed (paper
    scale: ResNet-18 on CIFAR-10)."""
    file = None if scale.name == "cpu" else "resnet18-cifar10"
    default = scale.base.get("eig_interval", 100)
    return sweep_plan(scale, _groups(scale), {"SAM", f"p={default} burst"}, file)


def specs(scale: Scale) -> tuple[Spec, ...]:
    """The claims: the largest p against SAM (Tables 3-4), the cost at p = 1000 (not testable
    here), and spread against burst at the default p (eigensam's, not the paper's)."""
    largest = f"p={max(CPU_PS if scale.name == 'cpu' else PAPER_PS)} burst"
    default = f"p={scale.base.get('eig_interval', 100)} burst"
    spread = default.replace("burst", "spread")
    ours = Paper(None, "not a paper claim")
    return (
        Compare(
            f"Eigen-SAM at the largest p ({largest[2:-6]}) keeps a higher accuracy than SAM "
            "(Tables 3-4)",
            largest,
            "SAM",
            "held_out_acc",
            +1,
            Paper(0.3, "ResNet-18, CIFAR-10, p = 1000, Tables 3-4", "95.8 vs 95.5"),
            **POINTS,
        ),
        Untestable(
            "p = 1000 costs less than 1% over SAM (§6.4)",
            Paper(None, "§6.4", "< 1% overhead"),
            "a CPU-scale run has fewer than 1,000 steps: p = 1000 would never refresh; "
            "measured ratios for the scaled p are in the table, and benchmarks/ "
            "measures the per-refresh cost",
        ),
        Compare(
            f"spread schedule tracks v₁ better than burst at equal products ({default})",
            spread,
            default,
            "opt_vector_cos_mean",
            +1,
            ours,
        ),
        Compare(
            f"spread schedule gives a higher accuracy than burst ({default})",
            spread,
            default,
            "held_out_acc",
            +1,
            ours,
            **POINTS,
        ),
    )


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    results = Results.load(plan)
    if scale.name == "cpu":
        add_final_fits(plan, results, fit=False)
    results.derive("opt_vector_cos_mean", functools.partial(run_mean, key="opt_vector_cos"))
    overhead = _time_ratios(results)
    tracking.write_json(
        out / "table34.json",
        {"scale": scale.note, "time_ratio_to_sam": overhead, "summaries": results.summaries},
    )
    body = (
        f"{scale.note}. q = {plan['SAM'][0].eig_iters} products per interval. Time/step ÷ SAM: "
        "training seconds per step (tracking excluded) over SAM's of the same seed; the runs "
        "shared the CPU with other runs, so these ratios are noisy (benchmarks/ measures cost "
        "on a quiet machine). |cos(v̂, v₁)|: the optimizer's estimate against the converged v₁ "
        "of the training batch at every measurement. Spread: after a first full refresh, one "
        "warm-started power step every p/q steps (same products per interval).\n\n"
        + _table(results, plan, overhead)
        + results.failure_note()
    )
    title = "Tables 3-4: refresh interval p and schedule"
    claims = judge(specs(scale), results)
    return Section("table3-4", title, command("table3-4", scale), body, [], claims)


def _time_ratios(results: Results) -> dict[str, list[float]]:
    """Per setting: training seconds per step over SAM's, seed by seed."""
    sam_time = {s["seed"]: s["train_seconds_per_step"] for s in results.summaries["SAM"]}
    return {
        label: [
            s["train_seconds_per_step"] / sam_time[s["seed"]]
            for s in summaries
            if s["seed"] in sam_time
        ]
        for label, summaries in results.summaries.items()
    }


def _table(results: Results, plan: Plan, overhead: dict[str, list[float]]) -> str:
    q = plan["SAM"][0].eig_iters
    rows = [
        "| setting | runs | test acc (%) | held-out acc (%) | mean \\|cos(v̂, v₁)\\| | "
        "time/step ÷ SAM | paper's cost model (2 + q/p … 2 + 2q/p) ÷ 2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, configs in plan.items():
        p = configs[0].eig_interval
        model = "1" if label == "SAM" else f"{1 + q / (2 * p):.3f} … {1 + q / p:.3f}"
        rows.append(
            f"| {label} | {len(results.summaries[label])} | "
            f"{fmt(results.values(label, 'test_acc'), 2, 100)} | "
            f"{fmt(results.values(label, 'held_out_acc'), 2, 100)} | "
            f"{fmt(results.values(label, 'opt_vector_cos_mean'))} | "
            f"{fmt(overhead[label], 3)} | {model} |"
        )
    return "\n".join(rows) + "\n"


TARGET = Target("table3-4", "Tables 3-4: refresh interval", plan, analyze, held_out=True)
