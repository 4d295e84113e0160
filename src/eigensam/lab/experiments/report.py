"""What a reproduction target reports: a markdown section with its figures, and one verdict per
claim of the paper, computed from the measurements (never typed in) by the rules of
:mod:`eigensam.lab.experiments.verdicts`: *reproduces*, *contradicted*, *inconclusive* or *not
testable on CPU*. Every claim states n, the standard deviation of its per-seed differences, the
minimum detectable effect at 80% power (two-sided 5% test) and, where the paper gives a number,
the seeds needed to detect the paper's effect.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from eigensam.atomic import atomic_write
from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.experiments.verdicts import NOT_TESTABLE, Evidence, seeds_needed, verdict


@dataclass
class Power:
    """The power of a comparison, in the claim's unit: ``n`` seeds (pairs), the standard
    deviation ``sd`` of the per-seed values (differences), the minimum detectable effect ``mde``
    (80% power, two-sided 5%) and the seeds ``needed`` to detect the paper's effect."""

    n: int
    sd: float | None
    mde: float | None
    needed: int | None = None
    digits: int = 3


@dataclass
class Claim:
    """One claim of the paper (or of the X-SAM paper), its number there, our measurement, the
    verdict and, for measured claims, the comparison's power."""

    claim: str
    paper: str
    measured: str
    verdict: str
    power: Power | None = None


@dataclass
class Section:
    """A target's part of the report: markdown body, figures (PNG paths) and claims;
    ``headline``: a short table and conclusion for the README (the decide target's)."""

    target: str
    title: str
    command: str
    body: str
    figures: list[Path] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    headline: str = ""


def fmt(values: Sequence[float | None], digits: int = 3, scale: float = 1.0) -> str:
    """``mean ± 95% CI`` of the values (see :func:`tracking.format_estimate`)."""
    return tracking.format_estimate(values, digits, scale)


def _sd(values: Sequence[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _power(values: Sequence[float], paper_effect: float | None, digits: int) -> Power:
    evidence = Evidence(0.0, None, len(values), _sd(values))
    needed = None
    if paper_effect is not None and evidence.sd is not None:
        needed = seeds_needed(evidence.sd, paper_effect)
    return Power(evidence.n, evidence.sd, evidence.mde(), needed, digits)


def paired_claim(
    claim: str,
    paper: str,
    a: Sequence[float],
    b: Sequence[float],
    *,
    expect: int,
    paper_effect: float | None = None,
    digits: int = 3,
    scale: float = 1.0,
    unit: str = "",
) -> Claim:
    """A claim that ``a − b`` has sign ``expect`` (+1 or −1) and, if given, the size
    ``paper_effect`` (in the scaled unit, e.g. accuracy points), judged on the 95% interval of
    the paired t-test over seeds by :func:`~eigensam.lab.experiments.verdicts.verdict`."""
    a_scaled, b_scaled = [scale * x for x in a], [scale * y for y in b]
    test = tracking.paired_test(a_scaled, b_scaled)
    mean, half, p = test["mean_diff"], test["ci"], test["p"]
    interval = "" if half is None else f" ± {half:.{digits}f}"
    p_text = "n/a" if p is None else f"{p:.3g}"
    measured = f"difference {mean:+.{digits}f}{interval}{unit} (paired t-test p = {p_text})"
    diffs = [x - y for x, y in zip(a_scaled, b_scaled, strict=True)]
    power = _power(diffs, paper_effect, digits)
    evidence = Evidence(float(mean), None if half is None else float(half), power.n, power.sd)
    return Claim(claim, paper, measured, verdict(evidence, expect, paper_effect), power)


def bound_claim(
    claim: str, paper: str, values: Sequence[float], *, below: float, digits: int = 3
) -> Claim:
    """A claim that the mean of ``values`` lies below ``below``: the effect is ``mean − below``
    with the claimed sign −1 (*reproduces* when the upper end of the 95% interval is below the
    threshold, *contradicted* when its lower end is above it)."""
    mean, half = tracking.mean_ci(list(values))
    power = _power(list(values), None, digits)
    evidence = Evidence(mean - below, half, power.n, power.sd)
    measured = f"{fmt(values, digits)} (threshold {below})"
    return Claim(claim, paper, measured, verdict(evidence, -1), power)


def not_testable(claim: str, paper: str, why: str) -> Claim:
    return Claim(claim, paper, why, NOT_TESTABLE)


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def claims_table(claims: Sequence[Claim]) -> str:
    """One row per claim: the paper's number, the measurement, n, the standard deviation of the
    per-seed differences (SD), the minimum detectable effect at 80% power (MDE), the seeds that
    would detect the paper's effect at that SD, and the verdict."""
    lines = [
        "| claim | paper | eigensam (this scale) | n | SD | MDE (80%) | seeds for paper's effect "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in claims:
        power = c.power
        if power is None:
            stats = ("–", "–", "–", "–")
        else:
            stats = (
                str(power.n),
                _number(power.sd, power.digits),
                _number(power.mde, power.digits),
                "–" if power.needed is None else str(power.needed),
            )
        cells = (c.claim, c.paper, c.measured, *stats, f"**{c.verdict}**")
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
    """One line per group (mean over its runs; marked points when there are fewer than 4)
    with a shaded 95% band."""
    for name, runs in groups.items():
        xs, means, halves = band(runs, kind, x, y)
        if not xs:
            continue
        (line,) = ax.plot(xs, means, label=name, marker="o" if len(xs) < 4 else None)
        low = [m - h for m, h in zip(means, halves, strict=True)]
        high = [m + h for m, h in zip(means, halves, strict=True)]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    tracking.finish_panel(ax, title, x)


def figure_title(fig: Any, *lines: str) -> None:
    """Set ``fig``'s title, each line wrapped to the figure's width (about 9 characters per
    inch at the default font size), so that a long scale note is not clipped at the edges."""
    width = max(20, int(fig.get_figwidth() * 9))
    wrapped = [textwrap.fill(line, width) for line in lines]
    fig.suptitle("\n".join(wrapped))


def save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return path


# --------------------------------------------------------------------------------------------
# The report: one page, one generated file per target

VERDICTS_FILE = "verdicts.md"
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"


def fill_headline(readme: Path, headline: str) -> None:
    """Replace the text between ``<!-- headline:start -->`` and ``<!-- headline:end -->`` in
    ``readme`` with ``headline``; ValueError when the markers are missing."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(HEADLINE_START), text.find(HEADLINE_END)
    if start < 0 or end < start:
        raise ValueError(f"readme: {readme} has no {HEADLINE_START} … {HEADLINE_END} markers")
    before, after = text[: start + len(HEADLINE_START)], text[end:]
    tracking.write_text(readme, f"{before}\n{headline.strip()}\n{after}")


def snippet(name: str, body: str) -> str:
    """``body`` between the snippet section markers ``name``: a docs page includes it with
    ``--8<-- "FILE.md:NAME"``, and an include of the whole file drops the markers."""
    return f"<!-- --8<-- [start:{name}] -->\n{body}\n<!-- --8<-- [end:{name}] -->"


def section_folder(page: Path) -> Path:
    """Where the sections of the report ``page`` lie: ``<folder of page>/<page's stem>/``."""
    return page.parent / page.stem


def claim_from_dict(values: Mapping[str, Any]) -> Claim:
    """A :class:`Claim` back from its JSON form (``dataclasses.asdict``)."""
    power = values.get("power")
    return Claim(**{**values, "power": None if power is None else Power(**power)})


def write_section(section: Section, page: Path, generated: str = "") -> Path:
    """Write one target's part of the report ``page``: ``<stem>/<target>.md`` (its title,
    command, ``generated`` note, body, figures and claims) and ``<stem>/<target>.json`` (its
    claims as data, from which the page's verdict table is built). Figures are copied to
    ``<stem>_figures/`` and linked relative to the page, which includes the section. Other
    targets' files are left as they are."""
    folder, figures_dir = section_folder(page), page.parent / f"{page.stem}_figures"
    folder.mkdir(parents=True, exist_ok=True)
    note = f" {generated}" if generated else ""
    parts = [f"## {section.title}\n\nRegenerate: `{section.command}`.{note}\n\n{section.body}"]
    for figure in section.figures:
        figures_dir.mkdir(parents=True, exist_ok=True)
        copy = figures_dir / f"{section.target}-{figure.name}"
        shutil.copyfile(figure, copy)
        link = Path(os.path.relpath(copy, page.parent)).as_posix()
        parts.append(f"![{section.target} {figure.stem}]({link})\n")
    if section.claims:
        parts.append(claims_table(section.claims))
    tracking.write_text(folder / f"{section.target}.md", "\n".join(parts))
    claims = [dataclasses.asdict(c) for c in section.claims]
    data = {"target": section.target, "title": section.title, "claims": claims}
    tracking.write_json(folder / f"{section.target}.json", data)
    return folder / f"{section.target}.md"


def read_section_claims(page: Path, target: str) -> list[Claim]:
    """The claims a target's section file of ``page`` holds (none when it has no file)."""
    file = section_folder(page) / f"{target}.json"
    if not file.is_file():
        return []
    return [claim_from_dict(c) for c in json.loads(file.read_text(encoding="utf-8"))["claims"]]


def written_targets(page: Path, order: Sequence[str]) -> list[str]:
    """The targets with a section file for ``page``: those of ``order`` first, in that order,
    then any others by name."""
    folder = section_folder(page)
    present = {p.stem for p in folder.glob("*.json")} if folder.is_dir() else set()
    return [t for t in dict.fromkeys(order) if t in present] + sorted(present - set(order))


def write_page(page: Path, header: str, order: Sequence[str]) -> None:
    """Rebuild the report ``page`` from the section files present: the ``header``, the table of
    every section's claims (``<stem>/verdicts.md``), then each section, each included by
    ``pymdownx.snippets`` (``--8<--``, paths relative to the page's folder)."""
    targets = written_targets(page, order)
    folder = section_folder(page)
    claims = [c for t in targets for c in read_section_claims(page, t)]
    folder.mkdir(parents=True, exist_ok=True)
    tracking.write_text(folder / VERDICTS_FILE, claims_table(claims) if claims else "")
    stem = folder.name
    parts = [header, "## Verdicts\n", f'--8<-- "{stem}/{VERDICTS_FILE}"\n']
    parts += [f'--8<-- "{stem}/{t}.md"\n' for t in targets]
    tracking.write_text(page, "\n".join(parts))


def write_report(
    sections: Sequence[Section],
    path: Path,
    *,
    header: str,
    order: Sequence[str] = (),
    generated: str = "",
) -> None:
    """Write each section's files (:func:`write_section`) and rebuild the page ``path``
    (:func:`write_page`): the sections of targets not in ``sections`` keep their files, so one
    target can be regenerated without the others."""
    for section in sections:
        write_section(section, path, generated)
    write_page(path, header, [*order, *(s.target for s in sections)])
