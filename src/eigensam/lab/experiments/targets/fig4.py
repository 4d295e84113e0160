"""Figure 4 (paper Appendix A): the counterexamples Reverse-SAM (ε = −ρĝ) and EGR
(f + ρ‖∇f‖) against SAM and SGD: train and test loss curves and accuracy."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.experiments.common import Plan, Results, Target, command, seeds_plan
from eigensam.lab.experiments.report import (
    Section,
    figure_title,
    fmt,
    paired_claim,
    plot_band,
    save_figure,
)
from eigensam.lab.experiments.runs import Scale

METHODS = ("sgd", "sam", "reverse-sam", "egr")
# Paper Appendix A, ResNet-18 on CIFAR-10, test accuracy (%).
PAPER = {"sam": "95.5 ± 0.1", "egr": "95.0 ± 0.2", "reverse-sam": "94.4 ± 0.2"}
# The paper's SAM − method accuracy gaps (points), from PAPER.
PAPER_GAP = {"egr": 0.5, "reverse-sam": 1.1}


def plan(scale: Scale) -> Plan:
    """SGD, SAM, Reverse-SAM and EGR, every seed (paper scale: ResNet-18 on CIFAR-10)."""
    file = None if scale.name == "cpu" else "resnet18-cifar10"
    return seeds_plan(scale, {m: {"method": m} for m in METHODS}, file=file)


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    results = Results.load(plan)
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    plot_band(axes[0], results.records, "eval", "epoch", "train_loss", "train loss (epoch mean)")
    plot_band(axes[1], results.records, "eval", "epoch", "test_loss", "test loss")
    plot_band(axes[2], results.records, "eval", "epoch", "test_acc", "test accuracy")
    figure_title(fig, f"Appendix A counterexamples at {scale.note}", "(95% bands over seeds)")
    figure = save_figure(fig, out / "fig4.png")
    tracking.write_json(out / "fig4.json", {"scale": scale.note, **results.summaries})
    rows = [
        "| method | runs | test acc (%) | test loss | train loss | paper (ResNet-18, CIFAR-10) |"
    ]
    rows.append("|---|---|---|---|---|---|")
    for m in METHODS:
        rows.append(
            f"| {m} | {len(results.summaries[m])} | {fmt(results.values(m, 'test_acc'), 2, 100)} "
            f"| {fmt(results.values(m, 'test_loss'), 4)} | "
            f"{fmt(results.values(m, 'train_loss'), 4)} | {PAPER.get(m, '–')} |"
        )
    body = f"{scale.note}.\n\n" + "\n".join(rows) + "\n" + results.failure_note()
    acc = dict(digits=2, scale=100.0, unit=" points")
    claims = [
        paired_claim(
            f"SAM has a higher test accuracy than {m} (Appendix A)",
            f"SAM {PAPER['sam']} vs {m} {PAPER[m]}",
            *results.paired("sam", m, "test_acc"),
            expect=1,
            paper_effect=PAPER_GAP[m],
            **acc,
        )
        for m in ("egr", "reverse-sam")
    ]
    return Section(
        "fig4",
        "Figure 4: Appendix A counterexamples",
        command("fig4", scale),
        body,
        [figure],
        claims,
    )


TARGET = Target("fig4", "Figure 4: counterexamples", plan, analyze)
