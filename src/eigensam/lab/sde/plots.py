"""The study's figures: Figure 2, Corollary 4.1.1, convergence in l and η-scaling."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.sde.trajectory import METRICS

COLORS = {"sam": "black", "sde2": "tab:blue", "sde3": "tab:red", "sgd": "tab:gray"}
LABELS = {"sam": "SAM (discrete)", "sde2": "2nd-order SDE", "sde3": "3rd-order SDE", "sgd": "SGD"}
TITLES = {
    "train_loss": "train loss",
    "test_loss": "test loss",
    "test_acc": "test accuracy",
    "weight_norm": "‖w‖",
    "grad_norm": "‖∇f‖",
    "lambda1": "λ₁ (fixed batch)",
}


def _save(fig: Any, path: Path) -> None:
    from eigensam.atomic import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def plot_figure2(
    runs: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]], path: Path, title: str
) -> None:
    """The paper's Figure 2: one panel per metric, each process's seed mean with its 95% band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8), layout="constrained")
    for ax, metric in zip(fig.subplots(2, 3).ravel(), METRICS, strict=True):
        for method, by_seed in runs.items():
            points: dict[int, list[float]] = {}
            for records in by_seed.values():
                for r in records:
                    if r.get(metric) is not None and math.isfinite(r[metric]):
                        points.setdefault(r["step"], []).append(r[metric])
            if not points:
                continue
            steps = sorted(points)
            stats = [tracking.mean_ci(points[k]) for k in steps]
            means = [m for m, _ in stats]
            halves = [h or 0.0 for _, h in stats]
            color = COLORS.get(method)
            ax.plot(steps, means, color=color, label=LABELS.get(method, method))
            ax.fill_between(
                steps,
                [m - h for m, h in zip(means, halves, strict=True)],
                [m + h for m, h in zip(means, halves, strict=True)],
                color=color,
                alpha=0.15,
            )
        tracking.finish_panel(ax, TITLES[metric], "step k (time kη)")
    fig.suptitle(title)
    _save(fig, path)


def plot_corollary(points: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Scatter of cos(∇³f(ĝ, ĝ), ∇λ₁) against Align(ε, v₁), coloured by step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    scatter = ax.scatter(
        [p["align"] for p in points],
        [p["cos_third"] for p in points],
        c=[p["step"] for p in points],
        cmap="viridis",
        s=18,
    )
    fig.colorbar(scatter, ax=ax, label="step")
    ax.set_xlabel("Align(ε, v₁)")
    ax.set_ylabel("cos(∇³f(ĝ, ĝ), ∇λ₁ = ∇³f(v₁, v₁))")
    ax.axhline(0, color="gray", lw=0.5)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize="medium")
    _save(fig, path)


def plot_l_convergence(results: Mapping[str, Any], path: Path) -> None:
    """Weak error against SVAG's ``l``, one panel per metric."""
    from matplotlib.figure import Figure

    errors = results["errors"].values()
    metrics = [m for m in METRICS if any(e[p].get(m) for e in errors for p in ("sde2", "sde3"))]
    columns = math.ceil(len(metrics) / 2)
    fig = Figure(figsize=(4.5 * columns, 7), layout="constrained")
    axes = fig.subplots(2, columns, squeeze=False).ravel()
    ls = results["l_values"]
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes, metrics, strict=False):
        for method in ("sde2", "sde3"):
            entries = [results["errors"][str(n)][method].get(metric) for n in ls]
            xs = [n for n, e in zip(ls, entries, strict=True) if e]
            ys = [e["error"] for e in entries if e]
            yerr = [e["ci"] or 0.0 for e in entries if e]
            ax.errorbar(
                xs, ys, yerr=yerr, marker="o", capsize=3, color=COLORS[method], label=LABELS[method]
            )
        ax.set_xscale("log", base=2)
        ax.set_title(TITLES[metric])
        ax.set_xlabel("SVAG l")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("weak error vs discrete SAM as SVAG's l grows (bars: MC 95% CI)")
    _save(fig, path)


def plot_eta_scaling(results: Mapping[str, Any], path: Path) -> None:
    """Log-log weak error against η, one row per ρ schedule, one column per metric."""
    from matplotlib.figure import Figure

    schedules = list(results["schedules"])
    metrics = results["metrics"]
    fig = Figure(figsize=(3.8 * len(metrics), 3.4 * len(schedules)), layout="constrained")
    axes = fig.subplots(len(schedules), len(metrics), squeeze=False)
    etas = results["eta_values"]
    for row, schedule in zip(axes, schedules, strict=True):
        block = results["schedules"][schedule]
        for ax, metric in zip(row, metrics, strict=True):
            for method in ("sde2", "sde3"):
                ys = [block["errors"][str(eta)][method][metric] for eta in etas]
                xs = [eta for eta, e in zip(etas, ys, strict=True) if e]
                vals = [e["error"] for e in ys if e]
                slope = block["slopes"][method][metric]
                label = LABELS[method] + ("" if slope is None else f" (slope {slope:.2f})")
                ax.plot(xs, vals, marker="o", color=COLORS[method], label=label)
                ax.plot(
                    xs,
                    [e["ci"] or float("nan") for e in ys if e],
                    ls=":",
                    color=COLORS[method],
                    alpha=0.6,
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{TITLES[metric]}, ρ = {block['c']:.3g}·{schedule}", fontsize="small")
            ax.set_xlabel("η")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize="x-small")
    fig.suptitle("weak error vs η at fixed horizon (dotted: MC 95% CI half-width)")
    _save(fig, path)
