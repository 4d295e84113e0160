"""Run folder outputs: config snapshot, JSONL metrics, atomic checkpoints, summary, plots, tables.

A run folder holds:

``config.yaml``
    the configuration the run was started with.
``metrics.jsonl``
    one JSON object per line, appended and flushed to disk (``fsync``) record by record, so a
    killed run leaves every finished record readable. Each record has a ``kind``: ``"train"``
    (mean training loss over the last few steps), ``"track"`` (sharpness measurement),
    ``"eval"`` (end of epoch evaluation) or ``"stopped"`` (why a run ended early).
``checkpoint.pt``
    the latest checkpoint, replaced atomically (written to a temporary file in the same folder,
    then ``os.replace``), so it is always either the previous or the new checkpoint.
``summary.json``
    final results, written atomically at the very end: its presence marks a finished run.
``curves.png`` and ``summary.md``
    the run's curves and its results table.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from matplotlib.figure import Figure

from eigensam.atomic import atomic_write

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "curves.png"
TABLE_FILE = "summary.md"
# What every checkpoint written by the training engine holds (Trainer.state_dict).
CHECKPOINT_KEYS = ("config", "step", "epoch", "model", "optimizer")
# What torch.load raises for a truncated file or one that is not a torch checkpoint.
UNREADABLE = (
    RuntimeError,
    EOFError,
    pickle.UnpicklingError,
    KeyError,
    IndexError,
    ValueError,
    TypeError,
    AttributeError,
    UnicodeDecodeError,
)

Record = dict[str, Any]

# --------------------------------------------------------------------------------------------
# Atomic files


def write_text(path: Path, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def write_yaml(path: Path, obj: Mapping[str, Any]) -> None:
    """Atomically write a mapping as YAML, keys in the given order."""
    write_text(path, yaml.safe_dump(dict(obj), sort_keys=False))


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Atomically ``torch.save`` a checkpoint."""
    atomic_write(path, lambda f: torch.save(dict(state), f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only).
    A truncated file, one that is not a torch checkpoint, or a torch file that is not a training
    checkpoint (no :data:`CHECKPOINT_KEYS`) raises ``ValueError`` naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE as error:
        reason = (str(error).splitlines() or [""])[0].split(". ")[0]
        raise ValueError(
            f"checkpoint {path} cannot be read: it is truncated or not a checkpoint written by "
            f"eigensam ({type(error).__name__}: {reason})"
        ) from error
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        held = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"checkpoint {path} is not an eigensam training checkpoint: it lacks {missing} "
            f"(it holds {held})"
        )
    return state


# --------------------------------------------------------------------------------------------
# JSONL metrics


def append_record(path: Path, record: Record) -> None:
    """Append one JSON line to ``path`` and flush it to disk before returning."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_records(path: Path, records: Iterable[Record]) -> None:
    """Atomically replace ``path`` with the given records, one JSON line each."""
    write_text(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in records))


def read_records(path: Path) -> list[Record]:
    """All records of a JSONL file. An unterminated last line (a write cut short by a kill) is
    ignored; any other malformed line raises ``ValueError`` naming the file and line."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: an interrupted append
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from error
    return records


# --------------------------------------------------------------------------------------------
# Statistics and tables


def _check_df(df: object) -> int:
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    return df


def t_central(t: float, df: int) -> float:
    """``P(|T| ≤ t)`` for Student's t with integer ``df`` degrees of freedom, ``t ≥ 0``, in
    closed form (Abramowitz & Stegun 26.7.3-4), with ``θ = atan(t/√df)``, ``c = cos²θ``:
    even df: ``sin θ · Σ_{j<df/2} a_j c^j``, ``a_0 = 1``, ``a_j = a_{j−1}(2j−1)/(2j)``;
    odd df: ``(2/π)(θ + sin θ cos θ · Σ_{j<(df−1)/2} b_j c^j)``, ``b_0 = 1``,
    ``b_j = b_{j−1}(2j)/(2j+1)`` (no sum for df = 1).
    """
    df = _check_df(df)
    theta = math.atan(t / math.sqrt(df))
    c = math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for j in range(1, df // 2):
            term *= c * (2 * j - 1) / (2 * j)
            total += term
        return math.sin(theta) * total
    term, total = 1.0, 1.0 if df > 1 else 0.0
    for j in range(1, (df - 1) // 2):
        term *= c * (2 * j) / (2 * j + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95%): solves
    ``t_central(t, df) = 0.95`` by bisection."""
    df = _check_df(df)
    low, high = 0.0, 1.0
    while t_central(high, df) < 0.95:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if t_central(mid, df) < 0.95 else (low, mid)
    return (low + high) / 2


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int | None]:
    """Paired comparison of ``a`` and ``b`` (same seeds, same order): the mean difference
    ``d̄ = mean(a_i − b_i)``, the half-width of its 95% Student-t interval, and the two-sided
    p-value of the paired t-test ``t = d̄ / (s_d/√n)`` with ``n − 1`` degrees of freedom
    (None for fewer than two pairs; 0 or 1 when all differences are equal)."""
    if len(a) != len(b):
        raise ValueError(f"a and b must pair up, got {len(a)} and {len(b)} values")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean, half = mean_ci(diffs)
    if n < 2:
        return {"n": n, "mean_diff": mean, "ci": None, "p": None}
    std = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    if std == 0:
        return {"n": n, "mean_diff": mean, "ci": 0.0, "p": 1.0 if mean == 0 else 0.0}
    t = abs(mean) / (std / math.sqrt(n))
    return {"n": n, "mean_diff": mean, "ci": half, "p": 1.0 - t_central(t, n - 1)}


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and half-width of its 95% Student-t confidence interval ``t_{0.975,n−1}·s/√n``
    (``s`` the sample standard deviation); the half-width is None for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("values must not be empty")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile_975(n - 1) * std / math.sqrt(n)


def format_estimate(values: Sequence[float | None], digits: int, scale: float = 1.0) -> str:
    """``mean ± half-width`` of the non-missing values times ``scale`` (just the value for one;
    ``–`` for none)."""
    present = [scale * v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return "–"
    mean, half = mean_ci(present)
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


# (summary key, column title, scale, digits)
SUMMARY_COLUMNS = (
    ("test_acc", "test acc (%)", 100.0, 2),
    ("test_loss", "test loss", 1.0, 4),
    ("final_lambda1", "final λ₁", 1.0, 3),
    ("mean_align", "mean Align(ε, v₁)", 1.0, 3),
    ("train_seconds", "train time (s)", 1.0, 1),
    ("track_seconds", "tracking time (s)", 1.0, 1),
)


def summary_table(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Markdown table, one row per group (method) of run summaries (seeds): every
    :data:`SUMMARY_COLUMNS` entry as mean ± 95% CI over the group's runs, plus their count."""
    header = ["method", "runs", *(title for _, title, _, _ in SUMMARY_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in groups.items():
        cells = [name, str(len(runs))]
        for key, _, scale, digits in SUMMARY_COLUMNS:
            cells.append(format_estimate([run.get(key) for run in runs], digits, scale))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "mean ± 95% confidence interval (Student t) over seeds; a single run shows its value.",
        "final λ₁: top Hessian eigenvalue of the training loss on a fixed batch at the end "
        "(Lanczos); mean Align: over the sharpness measurements during training.",
    ]
    gradient_rows = [
        name
        for name, runs in groups.items()
        if any(run.get("align_of") == "gradient" for run in runs)
    ]
    if gradient_rows:
        notes.append(
            f"{', '.join(gradient_rows)}: no perturbation is applied; "
            "Align is that of the gradient."
        )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


# --------------------------------------------------------------------------------------------
# Plots

# (record kind, x key, y key, title)
PANELS = (
    ("eval", "epoch", "test_acc", "test accuracy"),
    ("train", "step", "loss", "train loss"),
    ("track", "step", "lambda1", "λ₁ (top Hessian eigenvalue)"),
    ("track", "step", "align", "Align(ε, v₁)"),
)


def points_by_x(
    runs: Sequence[Sequence[Record]], kind: str, x: str, y: str
) -> dict[float, list[float]]:
    """Every ``x`` where some run has a finite ``y`` in a record of ``kind``, with those runs'
    values."""
    points: dict[float, list[float]] = {}
    for records in runs:
        for record in records:
            value = record.get(y)
            if record.get("kind") == kind and value is not None and math.isfinite(value):
                points.setdefault(record[x], []).append(value)
    return points


def mean_curve(
    runs: Sequence[Sequence[Record]], kind: str, x: str, y: str
) -> tuple[list[float], list[float]]:
    """``(xs, ys)``: at every ``x`` of :func:`points_by_x`, the mean of the runs' values."""
    points = points_by_x(runs, kind, x, y)
    xs = sorted(points)
    return xs, [math.fsum(points[k]) / len(points[k]) for k in xs]


def finish_panel(ax: Any, title: str, xlabel: str) -> None:
    """Title, x label, grid, and a legend, or "not measured" on a panel without lines."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def plot_curves(groups: Mapping[str, Sequence[Sequence[Record]]], path: Path, title: str) -> None:
    """A PNG with one panel per :data:`PANELS` entry and one line per group (its runs' mean)."""
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, (kind, x, y, panel_title) in zip(axes, PANELS, strict=True):
        for name, runs in groups.items():
            xs, ys = mean_curve(runs, kind, x, y)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=name)
        finish_panel(ax, panel_title, x)
    fig.suptitle(title)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
