"""Tables 3-4 (paper Appendix F): Eigen-SAM with refresh interval p against SAM, accuracy and
measured wall-time overhead; and eigensam's ``eig_schedule="spread"`` (the q products of an
interval spread over it, one every p/q steps) against the paper's burst at the same products."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.experiments.common import Plan, Results, Target, command, sweep_plan
from eigensam.lab.experiments.report import Section, fmt, not_testable, paired_claim
from eigensam.lab.experiments.runs import Scale
from eigensam.lab.experiments.targets.fig1 import paired_runs, per_run

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


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    results = Results.load(plan)
    q = plan["SAM"][0].eig_iters
    sam_time = {s["seed"]: s["train_seconds_per_step"] for s in results.summaries["SAM"]}
    rows = [
        "| setting | runs | test acc (%) | mean \\|cos(v̂, v₁)\\| | time/step ÷ SAM | "
        "paper's cost model (2 + q/p … 2 + 2q/p) ÷ 2 |",
        "|---|---|---|---|---|---|",
    ]
    overhead: dict[str, list[float]] = {}
    for label, configs in plan.items():
        ratios = [
            s["train_seconds_per_step"] / sam_time[s["seed"]]
            for s in results.summaries[label]
            if s["seed"] in sam_time
        ]
        overhead[label] = ratios
        p = configs[0].eig_interval
        model = "1" if label == "SAM" else f"{1 + q / (2 * p):.3f} … {1 + q / p:.3f}"
        cos = list(per_run(results, label, "opt_vector_cos").values())
        rows.append(
            f"| {label} | {len(results.summaries[label])} | "
            f"{fmt(results.values(label, 'test_acc'), 2, 100)} | {fmt(cos)} | "
            f"{fmt(ratios, 3)} | {model} |"
        )
    tracking.write_json(
        out / "table34.json",
        {"scale": scale.note, "time_ratio_to_sam": overhead, "summaries": results.summaries},
    )
    body = (
        f"{scale.note}. q = {q} products per interval. Time/step ÷ SAM: training seconds per "
        "step (tracking excluded) over SAM's of the same seed; the runs shared the CPU with "
        "other runs, so these ratios are noisy (benchmarks/ measures cost on a quiet machine). "
        "|cos(v̂, v₁)|: the optimizer's estimate against the converged v₁ of the training batch "
        "at every measurement. Spread: after a first full refresh, one warm-started power step "
        "every p/q steps (same products per interval).\n\n"
        + "\n".join(rows)
        + "\n"
        + results.failure_note()
    )
    ps = [int(label.split()[0][2:]) for label in plan if label.endswith("burst")]
    largest = f"p={max(ps)} burst"
    default = f"p={scale.base.get('eig_interval', 100)} burst"
    acc = dict(digits=2, scale=100.0, unit=" points")
    steps = next((str(s["steps"]) for s in results.summaries["SAM"]), "a few hundred")
    claims = [
        paired_claim(
            f"Eigen-SAM at the largest p ({max(ps)}) keeps a higher accuracy than SAM (Tables 3-4)",
            "p = 1000: 95.8 vs 95.5 (ResNet-18, CIFAR-10)",
            *results.paired(largest, "SAM", "test_acc"),
            expect=1,
            paper_effect=0.3,
            **acc,
        ),
        not_testable(
            "p = 1000 costs less than 1% over SAM (§6.4)",
            "< 1% overhead",
            f"a CPU-scale run has {steps} steps: p = 1000 would never refresh; measured ratios "
            "for the scaled p are in the table, and benchmarks/ measures the per-refresh cost",
        ),
        paired_claim(
            f"spread schedule tracks v₁ better than burst at equal products ({default}; not a "
            "paper claim)",
            "—",
            *paired_runs(results, default.replace("burst", "spread"), default, "opt_vector_cos"),
            expect=1,
        ),
        paired_claim(
            f"spread schedule gives a higher accuracy than burst ({default}; not a paper claim)",
            "—",
            *results.paired(default.replace("burst", "spread"), default, "test_acc"),
            expect=1,
            **acc,
        ),
    ]
    return Section(
        "table3-4",
        "Tables 3-4: refresh interval p and schedule",
        command("table3-4", scale),
        body,
        [],
        claims,
    )


TARGET = Target("table3-4", "Tables 3-4: refresh interval", plan, analyze)
