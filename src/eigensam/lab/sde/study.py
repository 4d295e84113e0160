"""The study behind ``eigensam sde``: Figure 2, convergence in l and η-scaling, run over seeds
with a cache of finished trajectories, and the files they write."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.train import check_device
from eigensam.lab.sde.config import SDEConfig
from eigensam.lab.sde.plots import (
    plot_corollary,
    plot_eta_scaling,
    plot_figure2,
    plot_l_convergence,
)
from eigensam.lab.sde.trajectory import METHODS, Batch, DivergedError, Tracking, Trajectory
from eigensam.lab.sde.weak_error import (
    WEAK_ERROR_CAPTION,
    corollary_summary,
    eta_scaling_markdown,
    fit_slope,
    weak_error_markdown,
    weak_error_table,
)
from eigensam.lab.workloads.datasets import DataSplits, TensorData, load_dataset
from eigensam.lab.workloads.models import build_model

RESULTS_FILE = "sde.json"
CACHE_FILE = "trajectories.json"
FIGURE_FILE = "figure2.png"
TABLE_FILE = "weak_errors.md"
COROLLARY_FILE = "corollary.png"
L_FILES = ("l_convergence.md", "l_convergence.png")
ETA_FILES = ("eta_scaling.md", "eta_scaling.png")
Runs = dict[str, dict[int, list[dict[str, Any]]]]
# ρ = c·η^p schedules of the η-scaling study: Theorem 4.1's regime ρ = O(η^(1/3)), Compagnoni et
# al.'s ρ = O(η^(1/2)), and ρ held constant (beyond both: the reproduction's open check (c)).
SCALING_POWERS = {"eta^(1/3)": 1 / 3, "eta^(1/2)": 1 / 2, "eta^0": 0.0}


def _load(config: SDEConfig) -> DataSplits:
    data = load_dataset(config.dataset, config.data_dir, config.train_subset)
    if config.test_subset is not None:
        n = min(config.test_subset, len(data.test))
        data.test = TensorData(data.test.images[:n], data.test.labels[:n])
    return data


@dataclass
class _Context:
    config: SDEConfig
    data: DataSplits
    x0: dict[str, Tensor]
    track_batch: Batch
    device: torch.device
    progress: Callable[[str], None]

    def model(self) -> nn.Module:
        data = self.data
        model = build_model(
            self.config.model,
            data.num_classes,
            data.in_channels,
            data.image_size,
            self.config.width,
        ).to(self.device)
        model.load_state_dict(self.x0)
        return model

    def trajectory(
        self,
        method: str,
        seed: int,
        *,
        lr: float,
        rho: float,
        svag_l: int,
        steps: int,
        track: Tracking,
    ) -> list[dict[str, Any]]:
        trajectory = Trajectory(
            method,
            self.model(),
            self.data,
            lr=lr,
            rho=rho,
            svag_l=svag_l,
            batch_size=self.config.batch_size,
            seed=seed,
            track=track,
            track_batch=self.track_batch,
            device=self.device,
        )
        label = f"[{method} seed {seed} η={lr:g} ρ={rho:.3g} l={svag_l}]"
        return trajectory.run(steps, lambda message: self.progress(f"{label} {message}"))


DISCRETE = ("sam", "sgd")
# Configuration fields every trajectory depends on; the cache is valid while they match.
SHARED_FIELDS = (
    "dataset",
    "train_subset",
    "test_subset",
    "model",
    "width",
    "batch_size",
    "init_seed",
    "track_batch",
    "device",
)


def trajectory_key(
    method: str, seed: int, *, lr: float, rho: float, svag_l: int, steps: int, track: Tracking
) -> str:
    """What determines one trajectory besides :data:`SHARED_FIELDS` (l only for the SDEs)."""
    scheme = f"|l={svag_l}" if method not in DISCRETE else ""
    return (
        f"{method}|seed={seed}|lr={lr!r}|rho={rho!r}{scheme}|steps={steps}|every={track.every}"
        f"|lambda_iters={track.lambda_iters}|corollary={track.corollary and method == 'sam'}"
    )


class _Study:
    """Results, saved after every trajectory, and the cache of finished trajectories
    (``trajectories.json``): a rerun in the same folder reuses those with the same key."""

    def __init__(self, config: SDEConfig, out: Path, progress: Callable[[str], None]):
        self.config, self.out, self.progress = config, out, progress
        self.results: dict[str, Any] = {"config": config.to_dict(), "complete": False}
        self.started = time.perf_counter()
        shared = {name: getattr(config, name) for name in SHARED_FIELDS}
        self.cache: dict[str, Any] = {"shared": shared, "trajectories": {}}
        path = out / CACHE_FILE
        if path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("shared") == json.loads(json.dumps(shared)):
                self.cache["trajectories"] = saved["trajectories"]

    def save(self) -> None:
        self.results["wall_seconds"] = time.perf_counter() - self.started
        tracking.write_json(self.out / RESULTS_FILE, self.results)

    def collect(
        self, runs: Runs, methods: Sequence[str], ctx: _Context, lr: float, rho: float, **kw: Any
    ) -> None:
        """Run every method for every seed into ``runs`` (which ``results`` shares), saving
        after each; on divergence keep and save the partial records before stopping."""
        for seed in self.config.seeds:
            for method in methods:
                key = trajectory_key(method, seed, lr=lr, rho=rho, **kw)
                if key in self.cache["trajectories"]:
                    self.progress(f"[{key}] reused from {CACHE_FILE}")
                    runs.setdefault(method, {})[seed] = self.cache["trajectories"][key]
                    continue
                try:
                    records = ctx.trajectory(method, seed, lr=lr, rho=rho, **kw)
                except DivergedError as error:
                    runs.setdefault(method, {})[seed] = error.records
                    self.results["stopped"] = str(error)
                    self.save()
                    raise
                runs.setdefault(method, {})[seed] = records
                self.cache["trajectories"][key] = records
                tracking.write_json(self.out / CACHE_FILE, self.cache)
                self.save()


def _context(config: SDEConfig, progress: Callable[[str], None]) -> _Context:
    device = check_device(config.device)
    data = _load(config)
    torch.manual_seed(config.init_seed)
    model = build_model(
        config.model, data.num_classes, data.in_channels, data.image_size, config.width
    )
    x0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n = min(config.track_batch, len(data.train))
    track_batch = (data.train.images[:n].to(device), data.train.labels[:n].to(device))
    return _Context(config, data, x0, track_batch, device, progress)


def _figure2(study: _Study, ctx: _Context) -> Runs:
    config = study.config
    runs: Runs = {}
    study.results["runs"] = runs
    track = Tracking(config.track_every, config.lambda_iters, config.corollary)
    study.collect(
        runs,
        METHODS,
        ctx,
        config.lr,
        config.rho,
        svag_l=config.svag_l,
        steps=config.steps,
        track=track,
    )
    errors = weak_error_table(runs)
    study.results["weak_errors"] = errors
    caption = (
        f"{WEAK_ERROR_CAPTION} {len(config.seeds)} seeds, η = {config.lr}, ρ = {config.rho}, "
        f"SVAG l = {config.svag_l}, {config.steps} steps, metrics every {config.track_every}."
    )
    tracking.write_text(study.out / TABLE_FILE, weak_error_markdown(errors, caption))
    plot_figure2(
        runs,
        study.out / FIGURE_FILE,
        f"SAM vs its SDEs: {config.model} on {config.dataset}, η = {config.lr}, "
        f"ρ = {config.rho}, l = {config.svag_l}, {len(config.seeds)} seeds (95% bands)",
    )
    if config.corollary and config.lambda_iters > 0:
        summary = corollary_summary(runs["sam"])
        study.results["corollary"] = summary
        plot_corollary(
            summary["points"],
            study.out / COROLLARY_FILE,
            f"Corollary 4.1.1 during SAM (ρ = {config.rho}): correlation "
            + ("–" if summary["correlation"] is None else f"{summary['correlation']:.2f}"),
        )
    study.save()
    return runs


def _l_convergence(study: _Study, ctx: _Context, base: Runs) -> dict[str, Any]:
    config = study.config
    ls = sorted(set(config.l_values) | {config.svag_l})
    block: dict[str, Any] = {"l_values": ls, "runs": {}, "errors": {}}
    study.results["l_convergence"] = block
    track = Tracking(config.track_every, config.lambda_iters)
    for n in ls:
        runs = block["runs"].setdefault(str(n), {})
        study.collect(
            runs,
            ("sde2", "sde3"),
            ctx,
            config.lr,
            config.rho,
            svag_l=n,
            steps=config.steps,
            track=track,
        )
        block["errors"][str(n)] = weak_error_table({"sam": base["sam"], **runs})
        study.save()
    lines = []
    for n in ls:
        errors = block["errors"][str(n)]
        lines.append(
            f"### l = {n}\n\n" + weak_error_markdown({m: errors[m] for m in ("sde2", "sde3")}, "")
        )
    text = "\n".join(lines) + "\n" + WEAK_ERROR_CAPTION + "\n"
    tracking.write_text(study.out / L_FILES[0], text)
    plot_l_convergence(block, study.out / L_FILES[1])
    return block


SCALING_METRICS = ("train_loss", "test_loss", "weight_norm", "grad_norm")


def _eta_scaling(study: _Study, ctx: _Context) -> dict[str, Any]:
    """For ρ = c·η^p (p = 1/3, 1/2; c such that ρ(config.lr) = config.rho), the weak error of
    each SDE at a fixed horizon for every η, and its fitted log-log slope."""
    config = study.config
    etas = sorted(config.eta_values, reverse=True)
    block: dict[str, Any] = {
        "eta_values": etas,
        "metrics": list(SCALING_METRICS),
        "horizon": config.eta_horizon,
        "schedules": {},
    }
    study.results["eta_scaling"] = block
    for name, power in SCALING_POWERS.items():
        c = config.rho / config.lr**power
        part: dict[str, Any] = {"c": c, "power": power, "runs": {}, "errors": {}, "slopes": {}}
        block["schedules"][name] = part
        for eta in etas:
            steps = max(1, round(config.eta_horizon / eta))
            track = Tracking(max(1, steps // 4), lambda_iters=0)
            runs: Runs = {}
            part["runs"][str(eta)] = runs
            study.collect(
                runs,
                ("sam", "sde2", "sde3"),
                ctx,
                eta,
                c * eta**power,
                svag_l=config.svag_l,
                steps=steps,
                track=track,
            )
            part["errors"][str(eta)] = weak_error_table(runs, SCALING_METRICS)
            study.save()
        for method in ("sde2", "sde3"):
            part["slopes"][method] = {
                metric: fit_slope(
                    etas,
                    [
                        (part["errors"][str(eta)][method][metric] or {"error": 0.0})["error"]
                        for eta in etas
                    ],
                )
                for metric in SCALING_METRICS
            }
    study.save()
    tracking.write_text(study.out / ETA_FILES[0], eta_scaling_markdown(block))
    plot_eta_scaling(block, study.out / ETA_FILES[1])
    return block


def run_sde(
    config: SDEConfig, out_dir: Path | str, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the study ``config`` describes, writing its files to ``out_dir``; return a summary:
    weak errors (Figure 2 setting, unless ``figure2=False``), the Corollary 4.1.1 statistics,
    the l-convergence and η-scaling results when asked for (``l_values``, ``eta_values``),
    files and wall time.

    Files (written atomically, ``sde.json`` after every trajectory): ``sde.json``,
    ``figure2.png``, ``weak_errors.md``, ``corollary.png``, ``l_convergence.{md,png}``,
    ``eta_scaling.{md,png}``. A diverging trajectory raises :class:`DivergedError` after its
    partial records are saved in ``sde.json``.
    """
    if not isinstance(config, SDEConfig):
        raise TypeError(f"config must be an SDEConfig, got {type(config).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda message: None)
    study = _Study(config, out, report)
    ctx = _context(config, report)
    if config.figure2:
        runs = _figure2(study, ctx)
        if config.l_values:
            _l_convergence(study, ctx, runs)
    if config.eta_values:
        _eta_scaling(study, ctx)
    study.results["complete"] = True
    study.save()
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    summary = {
        "out_dir": str(out),
        "wall_seconds": study.results["wall_seconds"],
        "weak_errors": study.results.get("weak_errors", {}),
        "corollary": {k: v for k, v in study.results.get("corollary", {}).items() if k != "points"},
        "files": files,
    }
    for key in ("l_convergence", "eta_scaling"):
        if key in study.results:
            summary[key] = {k: v for k, v in study.results[key].items() if k != "runs"}
    return summary
