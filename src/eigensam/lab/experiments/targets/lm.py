"""``eigensam reproduce lm``: does Eigen-SAM transfer to language modelling (the seed summary's
"transferability test")? AdamW, SAM(AdamW) and Eigen-SAM(AdamW) train
:class:`~eigensam.lab.workloads.gpt.TinyGPT`
on bytes of the Python standard library, every seed of the
scale; the report compares validation loss and perplexity, λ₁ and Align(ε, v₁) over training and
time per step, judged by the Evidence verdict rules, and states the measured accuracy of the
finite-difference Hessian-vector products (``hvp="auto"`` on SDPA attention) against the exact
product through SDPA's math backend.

The runs are language-model runs of :func:`eigensam.lab.engine.lm_training.train_lm`,
not runs of the image
engine, so :func:`plan` hands ``reproduce`` no engine runs; :func:`plan_runs` lists them and
:func:`analyze` trains those not finished (each run's record is a JSON file under
``<out>/lm/runs/``, reused when its settings match) before it writes the section.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.lm_training import METHODS, LMSettings, lm_corpus, train_lm
from eigensam.lab.experiments.claims import Compare, Paper, PerSeed, judge
from eigensam.lab.experiments.common import Plan, Target, command
from eigensam.lab.experiments.report import Section, figure_title, fmt, plot_band, save_figure
from eigensam.lab.experiments.runs import Scale

# CPU: 4 layers, width 128, context 64 (0.83M parameters), batch 16, 150 steps on 2 MB of
# stdlib bytes; planned at <= 30 min on 2 cores for 5 seeds (see SECONDS_PER_PASS).
CPU = LMSettings()
# Larger, for a GPU (not run here): 6 layers, width 256, context 256 on the whole corpus.
LARGE = replace(
    CPU,
    context=256,
    width=256,
    layers=6,
    heads=8,
    batch_size=64,
    steps=5000,
    warmup=200,
    optimizer=replace(CPU.optimizer, eig_interval=100),
    track_every=500,
    track_iters=20,
    eval_windows=2048,
    train_bytes=None,
    valid_bytes=None,
)
SETTINGS = {"cpu": CPU, "paper": LARGE}
# Measured: one forward-backward pass of the CPU model on one thread (tiny_gpt timing in
# docs/transformers.md); the plan's time estimate multiplies the passes by it.
SECONDS_PER_PASS = 0.22
LABELS = {"adamw": "AdamW", "sam": "SAM(AdamW)", "eigen-sam": "Eigen-SAM(AdamW)"}


@dataclass(frozen=True)
class LMRun:
    """One language-model run: a method, a seed, the settings; its record lives in
    ``<out>/runs/<method>-seed<seed>.json``. ``fd_check`` (the first seed's Eigen-SAM run)
    also measures the finite-difference products' accuracy."""

    method: str
    seed: int
    settings: LMSettings
    fd_check: bool = False

    def file(self, out: Path) -> Path:
        return out / "runs" / f"{self.method}-seed{self.seed}.json"


def settings_for(scale: Scale) -> LMSettings:
    if scale.name not in SETTINGS:
        raise ValueError(f"scale must be one of {', '.join(SETTINGS)}; got {scale.name!r}")
    return SETTINGS[scale.name]


def plan_runs(scale: Scale) -> list[LMRun]:
    """Every method for every seed, seed by seed (a partial set of runs still pairs up)."""
    settings = settings_for(scale)
    first = scale.seeds[0]
    return [
        LMRun(m, seed, settings, fd_check=(m == "eigen-sam" and seed == first))
        for seed in scale.seeds
        for m in METHODS
    ]


def planned_seconds(runs: list[LMRun]) -> float:
    """Estimated single-thread time of ``runs`` at :data:`SECONDS_PER_PASS` (the accuracy
    checks add about 140 passes)."""
    passes = sum(run.settings.passes(run.method) + (140 if run.fd_check else 0) for run in runs)
    return passes * SECONDS_PER_PASS


def plan(scale: Scale) -> Plan:
    """No runs of the image engine (see the module documentation); checks the scale and that
    no ``--device`` other than the CPU is asked for (this target trains on the CPU)."""
    settings_for(scale)
    device = scale.overrides.get("device")
    if device not in (None, "cpu"):
        raise ValueError(f"the lm target trains on the CPU; got --device {device!r}")
    return {}


def load_or_train(run: LMRun, out: Path, corpus: Any) -> dict[str, Any]:
    """The run's record from its file when its settings match, else trained and saved."""
    path = run.file(out)
    if path.is_file():
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("settings") == asdict(run.settings):
            return record
    started = time.perf_counter()
    print(f"lm: training {run.method} seed {run.seed}", file=sys.stderr, flush=True)
    record = train_lm(run.method, run.seed, run.settings, corpus, fd_check=run.fd_check)
    record["wall_seconds"] = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    tracking.write_json(path, record)
    return record


def run_mean(record: dict[str, Any], key: str, after: int = 0) -> float:
    """Mean of ``key`` over the run's measurements at steps > ``after``."""
    values = [t[key] for t in record["track"] if t["step"] > after]
    return math.fsum(values) / len(values)


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    settings = settings_for(scale)
    corpus = lm_corpus(settings)
    records = [load_or_train(run, out, corpus) for run in plan_runs(scale)]
    by_method = {m: [r for r in records if r["method"] == m] for m in METHODS}
    figure = _figure(by_method, len(scale.seeds), out)
    rows = [
        "| optimizer | validation loss | perplexity | λ₁ at the end | Align(ε, v₁) | s/step |",
        "|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        rs = by_method[m]
        rows.append(
            f"| {LABELS[m]} | {fmt([r['val_loss'] for r in rs])} "
            f"| {fmt([r['perplexity'] for r in rs], 2)} "
            f"| {fmt([r['track'][-1]['lambda1'] for r in rs], 2)} "
            f"| {fmt([run_mean(r, 'align') for r in rs])} "
            f"| {fmt([r['seconds_per_step'] for r in rs])} |"
        )
    checks = [r["fd_accuracy"] for r in records if r.get("fd_accuracy")]
    accuracy = "\n".join(fd_lines(checks[0])) if checks else "(no accuracy check in these runs)"
    body = (
        _setting(settings, corpus)
        + "\n\n"
        + "\n".join(rows)
        + "\n\n"
        + (
            "**Accuracy of the finite-difference products** (what `hvp='auto'` uses here: SDPA's "
            "fused CPU kernel has no double backward), relative error against the exact product "
            "through `sdpa_kernel(SDPBackend.MATH)`, on the curvature batch of the first seed's "
            "Eigen-SAM run:\n\n" + accuracy + "\n"
        )
    )
    claims = judge(SPECS, per_seed(by_method))
    title = "Language model: Eigen-SAM on a small GPT"
    return Section("lm", title, command("lm", scale), body, [figure], claims)


def _setting(s: LMSettings, corpus: Any) -> str:
    o = s.optimizer
    return (
        "This target does not use the image scale described at the top of the report: "
        f"TinyGPT ({s.layers} layers, width {s.width}, {s.heads} heads, context {s.context}, "
        f"SDPA attention) on bytes of the Python {platform.python_version()} standard "
        f"library's sources (files split {1 - s.valid_fraction:.0%}/{s.valid_fraction:.0%} by "
        f"path; {len(corpus.train):,} training bytes from {len(corpus.files['train'])} files, "
        f"validation loss on the first {s.eval_windows} validation windows), "
        f"{s.steps} steps of batch {s.batch_size}, AdamW lr {o.lr} (warm-up {s.warmup}, "
        f"cosine), weight decay {o.weight_decay}; SAM and Eigen-SAM ρ = {o.rho}, Eigen-SAM "
        f"α = {o.alpha}, p = {o.eig_interval}, q = {o.eig_iters}, hvp='auto'. λ₁ and Align "
        f"every {s.track_every} steps on one fixed training batch ({s.track_iters} warm-started "
        "power steps; Align of the perturbation the optimizer would apply, of ĝ for AdamW; "
        "the table's Align is the mean over the measurements after step 0). Time per step "
        "excludes the measurements."
    )


def _figure(by_method: dict[str, list[dict[str, Any]]], seeds: int, out: Path) -> Path:
    groups = {LABELS[m]: [r["track"] for r in by_method[m]] for m in METHODS}
    fig = Figure(figsize=(12, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    plot_band(axes[0], groups, "lm", "step", "val_loss", "validation loss (nats/byte)")
    plot_band(axes[1], groups, "lm", "step", "lambda1", "λ₁ (power iteration)")
    plot_band(axes[2], groups, "lm", "step", "align", "Align(ε, v₁)")
    figure_title(fig, f"TinyGPT on stdlib bytes, {seeds} seeds (95% bands)")
    return save_figure(fig, out / "lm.png")


def fd_lines(check: dict[str, Any]) -> list[str]:
    lines = []
    for when, label in (("init", "at initialization"), ("end", "after training")):
        if when not in check:
            continue
        c = check[when]
        worst = max(c["random"])
        lines.append(
            f"- {label}: random directions max {worst:.2e}, top eigenvector {c['top']:.2e}; "
            f"λ₁ exact {c['lambda1_exact']:.4g}, by differences {c['lambda1_fd']:.4g}"
        )
    return lines


SPECS = (
    Compare(
        "Transfer to language modelling: Eigen-SAM(AdamW) reaches a lower validation loss "
        "than SAM(AdamW)",
        "eigen-sam",
        "sam",
        "val_loss",
        -1,
        Paper(
            None,
            "Tables 1-2",
            "Eigen-SAM beats SAM in test accuracy on image classification; language models "
            "untested",
        ),
        unit=" nats/byte",
    ),
    Compare(
        "SAM(AdamW) reaches a lower validation loss than AdamW",
        "sam",
        "adamw",
        "val_loss",
        -1,
        Paper(None, "Tables 1-2", "SAM beats the base optimizer"),
        unit=" nats/byte",
    ),
    Compare(
        "Eigen-SAM's perturbation is better aligned with v₁ than SAM's (mean Align)",
        "eigen-sam",
        "sam",
        "align_mean",
        +1,
        Paper(None, "Fig. 1", "Align rises with Eigen-SAM"),
    ),
    Compare(
        "Eigen-SAM ends with a lower λ₁ than SAM",
        "eigen-sam",
        "sam",
        "final_lambda1",
        -1,
        Paper(None, "Fig. 1", "Eigen-SAM lowers the top eigenvalue more than SAM"),
        digits=2,
    ),
)


def per_seed(by_method: dict[str, list[dict[str, Any]]]) -> PerSeed:
    """Each run's validation loss, mean Align and final λ₁, by method and seed."""
    return PerSeed(
        {
            m: {
                r["seed"]: {
                    "val_loss": float(r["val_loss"]),
                    "align_mean": run_mean(r, "align"),
                    "final_lambda1": r["track"][-1]["lambda1"],
                }
                for r in runs
            }
            for m, runs in by_method.items()
        }
    )


TARGET = Target(
    "lm", "Language model: Eigen-SAM on a small GPT", plan, analyze, computes=True, specs=SPECS
)
