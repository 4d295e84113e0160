"""Open check (a) of the paper's summary: is the top Hessian eigenvector stable enough for
intermittent estimation (Algorithm 2 refreshes v̂ only every p steps)?

Eigen-SAM trains each architecture (the SimpleCNN, the one-hidden-layer GeLU MLP, the small ViT)
at two learning rates on the converged CPU scale's data. At anchor steps ``t`` and at ``t + Δ``
for Δ from 1 to a few hundred steps, v₁ of the training loss on a fixed batch (the first
``batch_size`` training images, unaugmented) is computed by Lanczos from a cold random start
(relative residual 1e-3), and the report gives ``|cos(v₁(t), v₁(t + Δ))|`` against Δ, mean ±
95% CI over seeds. These runs measure inside the training loop, so they are trained by the
target's analysis (in-process, one at a time) and cached in their folders.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.config import TrainConfig
from eigensam.lab.engine.sharpness_probe import SharpnessProbe
from eigensam.lab.engine.train import Trainer, make_closure
from eigensam.lab.experiments.claims import Below, Paper, PerSeed, judge
from eigensam.lab.experiments.common import Plan, Target, command
from eigensam.lab.experiments.report import Section, fmt, plot_band, save_figure
from eigensam.lab.experiments.runs import Scale

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "simplecnn": {"model": "simplecnn"},
    "mlp": {"model": "mlp", "width": 1.0, "init": "default"},
    "vit-small": {"model": "vit-small", "width": 0.5, "init": "default"},
}
LRS = (0.01, 0.03)
ANCHORS = (40, 240)  # steps t at which v₁(t) is compared with later ones
DELTAS = (1, 2, 5, 10, 20, 50, 100, 200)
LANCZOS_ITERS, LANCZOS_TOL = 30, 1e-3
QUIET = {"track_every": 0, "track_batches": 0, "snapshot_epochs": []}
RESULT_FILE = "stability.json"


def measurement_steps(anchors: Iterable[int], deltas: Iterable[int], total: int) -> list[int]:
    """Sorted steps at which v₁ is measured: every anchor ``t ≤ total`` and every ``t + Δ``
    that does not pass ``total`` (the run's last step)."""
    steps = set()
    for t in anchors:
        if t < 1:
            raise ValueError(f"anchors must be steps >= 1, got {t}")
        if t > total:
            continue
        steps.add(t)
        steps.update(t + d for d in deltas if t + d <= total)
    return sorted(steps)


def drift(vectors: Mapping[int, Tensor], anchors: Iterable[int], deltas: Iterable[int]) -> dict:
    """``{Δ: mean over anchors of |cos(v(t), v(t + Δ))|}`` for the pairs measured in
    ``vectors`` (step → eigenvector); Δ without any pair is left out."""
    out = {}
    for d in deltas:
        values = [
            abs(float(torch.dot(vectors[t], vectors[t + d])))
            / float(vectors[t].norm() * vectors[t + d].norm())
            for t in anchors
            if t in vectors and t + d in vectors
        ]
        if values:
            out[d] = math.fsum(values) / len(values)
    return out


def configs(scale: Scale) -> dict[str, list[TrainConfig]]:
    """``"<architecture> lr=<lr>"`` → one Eigen-SAM run per sweep seed, in the target's folder."""
    if scale.name != "cpu":
        raise ValueError("the eigenvector-stability check runs at CPU scale only")
    plan: dict[str, list[TrainConfig]] = {}
    for (arch, fields), lr in itertools.product(ARCHITECTURES.items(), LRS):
        label = f"{arch} lr={lr:g}"
        runs = []
        for seed in scale.sweep_seeds:
            config = scale.config(seed, method="eigen-sam", lr=lr, **fields, **QUIET)
            folder = scale.root / "stability" / "runs" / config.run_dir.name
            runs.append(TrainConfig(**{**config.to_dict(), "out_dir": str(folder)}))
        plan[label] = runs
    return plan


def plan(scale: Scale) -> Plan:
    """No engine runs (these measure inside the loop): the configurations are built, and so
    checked, here; :func:`analyze` trains them."""
    configs(scale)
    return {}


def measure_run(config: TrainConfig) -> dict[str, Any]:
    """Train one run, measuring v₁ on the fixed batch at :func:`measurement_steps`; cached in
    ``<run>/stability.json`` (an unfinished run is retrained from the start)."""
    cache = config.run_dir / RESULT_FILE
    if cache.is_file():
        return dict(json.loads(cache.read_text(encoding="utf-8")))
    if config.run_dir.exists():
        shutil.rmtree(config.run_dir)
    trainer = Trainer(config)
    total = trainer.total_steps
    wanted = set(measurement_steps(ANCHORS, DELTAS, total))
    images, labels = trainer.fixed_batches(1)[0]
    vectors: dict[int, Tensor] = {}
    lambdas: dict[int, float] = {}

    def on_step(t: Trainer) -> None:
        if t.step in wanted:
            closure = make_closure(t.model, t.criterion, images, labels)
            probe = SharpnessProbe(LANCZOS_ITERS, LANCZOS_TOL, seed=config.seed)
            record, vector, _ = probe.top_eigenpair(closure, t.model)
            vectors[t.step] = vector.detach().to(torch.float64).cpu()
            lambdas[t.step] = record["lambda1"]

    summary = trainer.run(on_step)
    result = {
        "seed": config.seed,
        "steps": total,
        "test_acc": summary["test_acc"],
        "lambda1": {str(k): v for k, v in lambdas.items()},
        "abs_cos": {str(k): v for k, v in drift(vectors, ANCHORS, DELTAS).items()},
    }
    tracking.write_json(cache, result)
    return result


def specs(scale: Scale) -> tuple[Below, ...]:
    """Per architecture, at the scale's learning rate: v₁ stays close over p steps."""
    p, lr = scale.base.get("eig_interval", 100), scale.base.get("lr", 0.1)
    return tuple(
        Below(
            f"{arch}: v₁ stays close over Eigen-SAM's refresh interval p = {p} (premise of "
            f"Algorithm 2): 1 − |cos(v₁(t), v₁(t+p))| below 0.5",
            f"{arch} lr={lr:g}",
            f"gap{p}",
            0.5,
            Paper(None, "", "implicit (v̂ refreshed every p steps)"),
        )
        for arch in ARCHITECTURES
    )


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    results: dict[str, list[dict[str, Any]]] = {}
    for label, runs in configs(scale).items():
        results[label] = []
        for config in runs:
            print(f"stability: {label} seed {config.seed}", file=sys.stderr, flush=True)
            results[label].append(measure_run(config))
    tracking.write_json(out / "stability.json", {"scale": scale.note, "runs": results})
    p = scale.base.get("eig_interval", 100)
    rows = ["| run | " + " | ".join(f"Δ={d}" for d in DELTAS) + " |"]
    rows.append("|---|" + "---|" * len(DELTAS))
    for label, runs in results.items():
        cells = [fmt([r["abs_cos"].get(str(d)) for r in runs], 3) for d in DELTAS]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    gaps = PerSeed(
        {
            label: {
                r["seed"]: {f"gap{p}": 1 - r["abs_cos"][str(p)]}
                for r in runs
                if str(p) in r["abs_cos"]
            }
            for label, runs in results.items()
        }
    )
    claims = [c for c in judge(specs(scale), gaps) if c.power is not None and c.power.n >= 2]
    body = (
        f"{scale.note}. Eigen-SAM (α = 0.2, p = {p}) per architecture and learning rate, "
        f"sweep seeds; v₁ of the loss on a fixed batch at anchors {list(ANCHORS)} and Δ steps "
        f"later (Lanczos from a cold start, ≤ {LANCZOS_ITERS} products, relative residual "
        f"{LANCZOS_TOL}); |cos| averaged over the anchors, mean ± 95% CI over seeds.\n\n"
        + "\n".join(rows)
        + "\n"
    )
    figure = _figure(results, out)
    title = "Open check (a): eigenvector stability"
    return Section("stability", title, command("stability", scale), body, [figure], claims)


def _figure(results: dict[str, list[dict[str, Any]]], out: Path) -> Path:
    curves = {
        label: [
            [{"kind": "drift", "delta": int(d), "abs_cos": c} for d, c in r["abs_cos"].items()]
            for r in runs
        ]
        for label, runs in results.items()
    }
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    plot_band(ax, curves, "drift", "delta", "abs_cos", "|cos(v₁(t), v₁(t+Δ))| (Eigen-SAM)")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)  # |cos| lies in [0, 1]; a t-interval over 3 seeds may not
    ax.set_xlabel("Δ (steps)")
    return save_figure(fig, out / "stability.png")


TARGET = Target("stability", "Open check (a): eigenvector stability", plan, analyze, computes=True)
