"""Figure 1 (paper §5.1): SAM's perturbation is poorly aligned with the top Hessian eigenvector
and λ₁ stays high; Eigen-SAM aligns it. Also the X-SAM paper's λ₁ and early-loss claims."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.experiments.claims import Below, Compare, Paper, judge
from eigensam.lab.experiments.common import Plan, Results, Target, command, epoch_value, seeds_plan
from eigensam.lab.experiments.report import Section, figure_title, fmt, plot_band, save_figure
from eigensam.lab.experiments.runs import Scale

METHODS = ("sgd", "sam", "eigen-sam", "x-sam")
PAPER_FIG1 = {"model": "simplecnn", "lr": 0.03, "track_batches": 2}


def plan(scale: Scale) -> Plan:
    """SGD, SAM, Eigen-SAM (α = 0.2) and X-SAM (α = 1) with sharpness tracking, every seed, on
    the short CPU scale (training dynamics). Paper scale: the SimpleCNN on CIFAR-10 with the
    ResNet-18 recipe (lr 0.03: no BatchNorm)."""
    if scale.name == "cpu":
        return seeds_plan(scale, {m: {"method": m} for m in METHODS}, short=True)
    return seeds_plan(
        scale, {m: {"method": m, **PAPER_FIG1} for m in METHODS}, file="resnet18-cifar10"
    )


SAM_ALIGN_BELOW = 0.5  # = 1 − 10ρ: |cos| < 0.875
SAM_ALIGN = Below(
    "SAM's perturbation is poorly aligned with v₁ (§5.1): mean Align(ε_SAM, v₁) far "
    "from Corollary 4.1.1's 1 − O(ρ), below 0.5 = 1 − 10ρ (|cos| < 0.875)",
    "sam",
    "fixed_align_mean",
    SAM_ALIGN_BELOW,
    Paper(None, "Fig. 1 left", "poor alignment"),
)
# The sharpness claims, shared with the headline (which measures Align over its own runs).
SAM_FLATTER = Compare(
    "SAM ends at a lower λ₁ than SGD",
    "sam",
    "sgd",
    "final_lambda1",
    -1,
    Paper(None, "implied: SAM regularizes sharpness"),
    digits=2,
)
EIGEN_ALIGNS = Compare(
    "Eigen-SAM aligns ε with v₁ better than SAM (§5.2)",
    "eigen-sam",
    "sam",
    "fixed_align_mean",
    +1,
    Paper(None, "§5.2", "the method's purpose"),
)
EIGEN_FLATTER = Compare(
    "Eigen-SAM ends at a lower λ₁ than SAM (§6.5)",
    "eigen-sam",
    "sam",
    "final_lambda1",
    -1,
    Paper(None, "Fig. 3 right", "smaller top eigenvalue"),
    digits=2,
)
XSAM_CLAIMS = tuple(
    Compare(claim, "x-sam", "sam", metric, -1, Paper(None, "X-SAM paper", paper), digits=digits)
    for claim, metric, paper, digits in (
        (
            "X-SAM keeps a lower λ₁ than SAM throughout training (X-SAM paper)",
            "fixed_lambda1_mean",
            "lower λ₁ throughout",
            2,
        ),
        (
            "X-SAM reduces the training loss faster than SAM in the first epoch (X-SAM paper)",
            "epoch1_train_loss",
            "faster early decrease",
            4,
        ),
    )
)
SPECS = (SAM_ALIGN, SAM_FLATTER, EIGEN_ALIGNS, EIGEN_FLATTER, *XSAM_CLAIMS)


def run_mean(records: Sequence[tracking.Record], key: str) -> float | None:
    """Mean of ``key`` over a run's tracking records."""
    values = [r[key] for r in records if r.get("kind") == "track" and r.get(key) is not None]
    return math.fsum(values) / len(values) if values else None


def add_run_means(results: Results) -> None:
    """``fixed_align_mean`` and ``fixed_lambda1_mean`` (means over the run's measurements on
    the fixed batches) and ``epoch1_train_loss`` in every run's summary."""
    for key in ("fixed_align", "fixed_lambda1"):
        results.derive(f"{key}_mean", functools.partial(run_mean, key=key))
    results.derive("epoch1_train_loss", functools.partial(epoch_value, epoch=1, key="train_loss"))


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    results = Results.load(plan)
    add_run_means(results)
    figure = _figure(results, scale, out)
    align = {m: results.values(m, "fixed_align_mean") for m in METHODS}
    lam = {m: results.values(m, "fixed_lambda1_mean") for m in METHODS}
    final = {m: results.values(m, "final_lambda1") for m in METHODS}
    tracking.write_json(
        out / "fig1.json",
        {
            "scale": scale.note_for(True),
            "mean_align": align,
            "mean_lambda1": lam,
            "final_lambda1": final,
        },
    )
    rows = [
        "| method | runs | mean Align(ε, v₁) | mean λ₁ over training | final λ₁ | test acc (%) |",
        "|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        rows.append(
            f"| {m} | {len(results.summaries[m])} | {fmt(align[m])} | {fmt(lam[m], 2)} | "
            f"{fmt(final[m], 2)} | {fmt(results.values(m, 'test_acc'), 2, 100)} |"
        )
    body = (
        f"{scale.note_for(True)}. Align and λ₁ are means over the run's measurements (every "
        f"{plan['sam'][0].track_every} steps, 2 fixed unaugmented batches, v₁ by Lanczos to "
        f"relative residual {plan['sam'][0].track_tol}); final λ₁ on one fixed batch at the end. "
        "For SGD the Align column is that of the gradient. Mean ± 95% CI over seeds.\n\n"
        + "\n".join(rows)
        + f"\n\nThe 95% intervals of SAM's and SGD's final λ₁ {_overlap(final)}.\n"
        + results.failure_note()
    )
    title = "Figure 1: alignment and λ₁ during training"
    claims = judge(SPECS, results)
    return Section("fig1", title, command("fig1", scale), body, [figure], claims)


def _overlap(final: dict[str, list[float]]) -> str:
    sam_ci, sgd_ci = tracking.mean_ci(final["sam"]), tracking.mean_ci(final["sgd"])
    overlap = (sam_ci[0] + (sam_ci[1] or 0)) >= (sgd_ci[0] - (sgd_ci[1] or 0))
    return "overlap" if overlap else "do not overlap"


def _figure(results: Results, scale: Scale, out: Path) -> Path:
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    groups = results.records
    plot_band(axes[0], groups, "track", "step", "fixed_align", "Align(ε, v₁), 2 fixed batches")
    plot_band(axes[1], groups, "track", "step", "fixed_lambda1", "λ₁, 2 fixed batches (log)")
    axes[1].set_yscale("log")
    plot_band(axes[2], groups, "train", "step", "loss", "train loss")
    plot_band(axes[3], groups, "eval", "epoch", "test_acc", "test accuracy")
    figure_title(
        fig,
        f"Figure 1 at {scale.note_for(True)}",
        "(mean, 95% band over seeds; SGD: Align of ∇f)",
    )
    return save_figure(fig, out / "fig1.png")


TARGET = Target("fig1", "Figure 1: alignment and λ₁", plan, analyze, specs=SPECS)
