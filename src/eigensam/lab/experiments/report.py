"""What a reproduction target reports: a markdown section with its figures, and one verdict per
claim of the paper, computed from the measurements by the rules below (never typed in).

Verdicts:

- ``reproduces``: the measured effect has the paper's sign and its 95% interval excludes zero
  (for paired comparisons: the paired t-test over seeds, p < 0.05);
- ``does not reproduce``: the interval includes zero (no detectable effect at this scale) or
  the effect has the opposite sign;
- ``not testable on CPU``: the claim needs models, data or hardware this scale does not have.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from eigensam.atomic import atomic_write
from eigensam.lab import tracking

REPRODUCES = "reproduces"
DOES_NOT = "does not reproduce"
NOT_TESTABLE = "not testable on CPU"


@dataclass
class Claim:
    """One claim of the paper (or of the X-SAM paper), its number there, our measurement and
    the verdict."""

    claim: str
    paper: str
    measured: str
    verdict: str


@dataclass
class Section:
    """A target's part of the report: markdown body, figures (PNG paths) and claims."""

    target: str
    title: str
    command: str
    body: str
    figures: list[Path] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)


def fmt(values: Sequence[float | None], digits: int = 3, scale: float = 1.0) -> str:
    """``mean ± 95% CI`` of the values (see :func:`tracking.format_estimate`)."""
    return tracking.format_estimate(values, digits, scale)


def paired_claim(
    claim: str,
    paper: str,
    a: Sequence[float],
    b: Sequence[float],
    *,
    expect: int,
    digits: int = 3,
    scale: float = 1.0,
    unit: str = "",
) -> Claim:
    """A claim that ``a − b`` has sign ``expect`` (+1 or −1), judged by the paired t-test."""
    test = tracking.paired_test([scale * x for x in a], [scale * y for y in b])
    mean, half, p = test["mean_diff"], test["ci"], test["p"]
    interval = "" if half is None else f" ± {half:.{digits}f}"
    p_text = "n/a" if p is None else f"{p:.3g}"
    measured = (
        f"difference {mean:+.{digits}f}{interval}{unit} "
        f"(paired t-test p = {p_text}, n = {test['n']})"
    )
    significant = p is not None and p < 0.05
    verdict = REPRODUCES if significant and math.copysign(1, mean) == expect else DOES_NOT
    return Claim(claim, paper, measured, verdict)


def bound_claim(claim: str, paper: str, values: Sequence[float], *, below: float) -> Claim:
    """A claim that the mean of ``values`` lies below ``below``: reproduces when the upper end
    of its 95% interval does."""
    mean, half = tracking.mean_ci(list(values))
    upper = mean + (half or 0.0)
    verdict = REPRODUCES if upper < below else DOES_NOT
    return Claim(claim, paper, f"{fmt(values)} (threshold {below})", verdict)


def not_testable(claim: str, paper: str, why: str) -> Claim:
    return Claim(claim, paper, why, NOT_TESTABLE)


def claims_table(claims: Sequence[Claim]) -> str:
    lines = ["| claim | paper | eigensam (this scale) | verdict |", "|---|---|---|---|"]
    for c in claims:
        cells = (c.claim, c.paper, c.measured, f"**{c.verdict}**")
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Curves with confidence bands


def band(
    runs: Sequence[Sequence[tracking.Record]], kind: str, x: str, y: str
) -> tuple[list[float], list[float], list[float]]:
    """``(xs, means, half-widths)``: at every ``x`` where at least one run has a finite ``y``
    in a record of ``kind``, the mean over runs and the half-width of its 95% interval (0 for
    a single run)."""
    points = tracking.points_by_x(runs, kind, x, y)
    xs = sorted(points)
    stats = [tracking.mean_ci(points[k]) for k in xs]
    return xs, [m for m, _ in stats], [h or 0.0 for _, h in stats]


def plot_band(
    ax: Axes,
    groups: Mapping[str, Sequence[Sequence[tracking.Record]]],
    kind: str,
    x: str,
    y: str,
    title: str,
) -> None:
    """One line per group (mean over its runs) with a shaded 95% band."""
    for name, runs in groups.items():
        xs, means, halves = band(runs, kind, x, y)
        if not xs:
            continue
        (line,) = ax.plot(xs, means, label=name)
        low = [m - h for m, h in zip(means, halves, strict=True)]
        high = [m + h for m, h in zip(means, halves, strict=True)]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    tracking.finish_panel(ax, title, x)


def save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return path


# --------------------------------------------------------------------------------------------
# The report file


def write_report(
    sections: Sequence[Section], path: Path, *, header: str, figures_dir: Path | None = None
) -> None:
    """Write the markdown report to ``path``: the header, a table of every claim, then each
    section. Figures are copied next to it (``<stem>_figures/``) so the report is readable
    wherever it is moved with that folder."""
    figures_dir = figures_dir or path.parent / f"{path.stem}_figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    claims = [c for s in sections for c in s.claims]
    parts = [header, "## Verdicts\n", claims_table(claims)] if claims else [header]
    for section in sections:
        parts.append(f"## {section.title}\n\nRegenerate: `{section.command}`.\n\n{section.body}")
        for figure in section.figures:
            copy = figures_dir / f"{section.target}-{figure.name}"
            shutil.copyfile(figure, copy)
            link = Path(os.path.relpath(copy, path.parent)).as_posix()
            parts.append(f"![{section.target} {figure.stem}]({link})\n")
        if section.claims:
            parts.append(claims_table(section.claims))
    tracking.write_text(path, "\n".join(parts))
