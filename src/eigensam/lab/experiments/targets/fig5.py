"""Figure 5 (paper Appendix F): convergence of the top-eigenvector estimate (power iteration,
paper Algorithm 1, and Lanczos) against the number of Hessian-vector products, at mid-training
of the trained Eigen-SAM models, from a cold start and from the optimizer's own warm start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from eigensam.lab.curvature_reports import power_convergence_report
from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.train import snapshot_file
from eigensam.lab.engine.trained_model import fixed_batches, load_trained
from eigensam.lab.experiments.claims import Below, Paper, PerSeed, judge
from eigensam.lab.experiments.common import Plan, Target, command
from eigensam.lab.experiments.report import Section, fmt, save_figure
from eigensam.lab.experiments.runs import Scale
from eigensam.lab.experiments.targets import fig1

SAMPLES, MAX_STEPS, FEW = 128, 20, 5


def plan(scale: Scale) -> Plan:
    """fig1's Eigen-SAM runs (their mid-training snapshot is measured)."""
    return {"eigen-sam": fig1.plan(scale)["eigen-sam"]}


SPECS = (
    Below(
        "Power iteration needs only a few products: warm-started, 1 − |cos(v̂, v₁)| < 0.1 "
        "after q = 5 (Appendix F)",
        "power/warm",
        "gap",
        0.1,
        Paper(None, "Fig. 5", "converges in a few steps"),
    ),
)


def measure(plan: Plan, out: Path) -> dict[int, dict[str, Any]]:
    """Seed -> the power-convergence report (:func:`power_convergence_report`, cached under
    ``out/seed<s>/``) of its Eigen-SAM run's mid-training snapshot, for the seeds that have
    one."""
    reports: dict[int, dict[str, Any]] = {}
    for config in plan["eigen-sam"]:
        epoch = config.snapshot_epochs[0] if config.snapshot_epochs else config.epochs
        snapshot = config.run_dir / snapshot_file(epoch)
        if not snapshot.is_file():
            continue
        folder = out / f"seed{config.seed}"
        cached = folder / "power_convergence.json"
        if cached.is_file():
            reports[config.seed] = json.loads(cached.read_text(encoding="utf-8"))
            continue
        trained = load_trained(snapshot)
        samples = min(SAMPLES, trained.config.train_subset or SAMPLES)
        batches = fixed_batches(trained.config, samples, samples)
        reports[config.seed] = power_convergence_report(
            trained.model,
            batches,
            folder,
            max_steps=MAX_STEPS,
            warm_start=trained.tracker_vector,
            seed=config.seed,
            label=f"eigen-sam seed {config.seed} epoch {epoch}",
        )
    return reports


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    reports = measure(plan, out)
    curves = {
        f"{method}/{start}": {
            seed: r["curves"][method][start]["abs_cos"]
            for seed, r in reports.items()
            if start in r["curves"][method]
        }
        for method in ("power", "lanczos")
        for start in ("cold", "warm")
    }
    curves = {k: v for k, v in curves.items() if v}
    figure = _figure(curves, len(reports), out)
    at_few = {k: [c[FEW] for c in v.values()] for k, v in curves.items()}
    tracking.write_json(
        out / "fig5.json", {"scale": scale.note_for(True), "abs_cos_after_5": at_few}
    )
    rows = ["| solver, start | |cos(v̂, v₁)| after 5 products |", "|---|---|"]
    rows += [f"| {k} | {fmt(v)} |" for k, v in at_few.items()]
    body = (
        f"{scale.note_for(True)}. Models: fig1's Eigen-SAM runs at epoch "
        f"{plan['eigen-sam'][0].snapshot_epochs or 'end'} (mid-training); Hessian of the "
        f"training loss on the first {SAMPLES} training samples; v₁ converged by Lanczos; warm "
        "start: the optimizer's own estimate v̂ in the checkpoint.\n\n" + "\n".join(rows) + "\n"
    )
    gaps = PerSeed({k: {s: {"gap": 1 - c[FEW]} for s, c in v.items()} for k, v in curves.items()})
    claims = judge(SPECS, gaps) if "power/warm" in curves else []
    title = "Figure 5: power-iteration convergence"
    return Section("fig5", title, command("fig5", scale), body, [figure], claims)


def _figure(curves: dict[str, dict[int, list[float]]], seeds: int, out: Path) -> Path:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    steps = list(range(MAX_STEPS + 1))
    for name, by_seed in curves.items():
        stats = [tracking.mean_ci([c[t] for c in by_seed.values()]) for t in steps]
        means = [m for m, _ in stats]
        halves = [h or 0.0 for _, h in stats]
        (line,) = ax.plot(steps, means, label=f"{name.replace('/', ', ')} start")
        ax.fill_between(
            steps,
            [m - h for m, h in zip(means, halves, strict=True)],
            [m + h for m, h in zip(means, halves, strict=True)],
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    ax.set_xlabel("Hessian-vector products")
    ax.set_ylabel("|cos(v̂, v₁)|")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"Estimate convergence at mid-training ({seeds} seeds, 95% bands)")
    return save_figure(fig, out / "fig5.png")


TARGET = Target(
    "fig5",
    "Figure 5: power-iteration convergence",
    plan,
    analyze,
    computes=True,
    specs=SPECS,
)
