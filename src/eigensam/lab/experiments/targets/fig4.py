"""Figure 4 (paper Appendix A): the counterexamples Reverse-SAM (ε = −ρĝ) and EGR
(f + ρ‖∇f‖) against SAM and SGD: train and test loss curves and accuracy."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.experiments.claims import POINTS, Compare, Paper, judge
from eigensam.lab.experiments.common import Plan, Results, Target, command, seeds_plan
from eigensam.lab.experiments.convergence import add_final_fits
from eigensam.lab.experiments.report import Section, figure_title, fmt, plot_band, save_figure
from eigensam.lab.experiments.runs import Scale

METHODS = ("sgd", "sam", "reverse-sam", "egr")
# Paper Appendix A, ResNet-18 on CIFAR-10, test accuracy (%).
PAPER = {"sam": "95.5 ± 0.1", "egr": "95.0 ± 0.2", "reverse-sam": "94.4 ± 0.2"}
# The paper's SAM − method accuracy gaps (points), from PAPER.
PAPER_GAP = {"egr": 0.5, "reverse-sam": 1.1}


SPECS = tuple(
    Compare(
        f"SAM has a higher held-out accuracy than {m} (Appendix A)",
        "sam",
        m,
        "held_out_acc",
        +1,
        Paper(PAPER_GAP[m], "ResNet-18, CIFAR-10, Appendix A", f"SAM {PAPER['sam']} vs {PAPER[m]}"),
        **POINTS,
    )
    for m in ("egr", "reverse-sam")
)


def plan(scale: Scale) -> Plan:
    """SGD, SAM, Reverse-SAM and EGR, every seed (paper scale: ResNet-18 on CIFAR-10)."""
    file = None if scale.name == "cpu" else "resnet18-cifar10"
    return seeds_plan(scale, {m: {"method": m} for m in METHODS}, file=file)


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    results = Results.load(plan)
    if scale.name == "cpu":
        add_final_fits(plan, results, fit=False)
    figure = _figure(results, scale, out)
    tracking.write_json(out / "fig4.json", {"scale": scale.note, **results.summaries})
    rows = [
        "| method | runs | test acc (%) | held-out acc (%) | test loss | train loss | paper "
        "(ResNet-18, CIFAR-10) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        rows.append(
            f"| {m} | {len(results.summaries[m])} | {fmt(results.values(m, 'test_acc'), 2, 100)} "
            f"| {fmt(results.values(m, 'held_out_acc'), 2, 100)} "
            f"| {fmt(results.values(m, 'test_loss'), 4)} | "
            f"{fmt(results.values(m, 'train_loss'), 4)} | {PAPER.get(m, '–')} |"
        )
    body = f"{scale.note}.\n\n" + "\n".join(rows) + "\n" + results.failure_note()
    title = "Figure 4: Appendix A counterexamples"
    return Section("fig4", title, command("fig4", scale), body, [figure], judge(SPECS, results))


def _figure(results: Results, scale: Scale, out: Path) -> Path:
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    plot_band(axes[0], results.records, "eval", "epoch", "train_loss", "train loss (epoch mean)")
    plot_band(axes[1], results.records, "eval", "epoch", "test_loss", "test loss")
    plot_band(axes[2], results.records, "eval", "epoch", "test_acc", "test accuracy")
    figure_title(fig, f"Appendix A counterexamples at {scale.note}", "(95% bands over seeds)")
    return save_figure(fig, out / "fig4.png")


TARGET = Target("fig4", "Figure 4: counterexamples", plan, analyze, held_out=True, specs=SPECS)
