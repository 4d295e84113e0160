"""Claims as data: each target declares the paper's claims it tests as specs (what is compared,
on which metric, the paper's effect and direction, or a threshold), and one judge turns specs
and measured values into the report's rows, with the verdict rules of
:mod:`~eigensam.lab.experiments.verdicts`.

One comparison gets one verdict: a spec is judged against the paper's figure for the setting
closest to the measured one (:attr:`Compare.paper`); the paper's figures for other settings are
quoted beside it as context (:attr:`Compare.context`), never judged. A comparison that another
target decides with more seeds is reported with its power only (:attr:`Compare.decided_by`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from eigensam.lab.experiments.report import Claim, bound_claim, not_testable, paired_claim

# Accuracy claims are judged in points (percent).
POINTS: dict[str, Any] = {"scale": 100.0, "digits": 2, "unit": " points"}


@dataclass(frozen=True)
class Paper:
    """A figure of the paper: its signed ``effect`` in the claim's unit (None when the paper
    gives a direction only), the ``setting`` it was measured in, and how the paper states it."""

    effect: float | None
    setting: str
    text: str = ""

    def describe(self) -> str:
        size = "" if self.effect is None else f"{self.effect:+g} "
        inner = "; ".join(part for part in (self.text, self.setting) if part)
        return f"{size}({inner})" if size else inner


@dataclass(frozen=True)
class Compare:
    """A claim that ``metric``'s paired difference ``a − b`` over seeds has ``sign`` (+1/−1),
    judged against ``paper`` (the closest setting's figure); ``context`` figures are quoted.
    ``scale``/``digits``/``unit`` format the difference (:data:`POINTS` for accuracies).
    ``decided_by``: the target whose larger run decides this comparison; here the row gives
    the measurement and its power, without a verdict."""

    claim: str
    a: str
    b: str
    metric: str
    sign: int
    paper: Paper
    context: tuple[Paper, ...] = ()
    scale: float = 1.0
    digits: int = 3
    unit: str = ""
    decided_by: str | None = None


@dataclass(frozen=True)
class Below:
    """A claim that the mean of ``metric`` over ``group``'s seeds lies below ``threshold``."""

    claim: str
    group: str
    metric: str
    threshold: float
    paper: Paper
    digits: int = 3


@dataclass(frozen=True)
class Untestable:
    """A claim this scale cannot test, and why."""

    claim: str
    paper: Paper
    why: str


Spec = Compare | Below | Untestable


class Measurements(Protocol):
    """What the judge reads: per-seed values of a group, and two groups' values paired by seed
    (:class:`~eigensam.lab.experiments.common.Results` is one)."""

    def values(self, label: str, key: str) -> list[float]: ...

    def paired(self, a: str, b: str, key: str) -> tuple[list[float], list[float]]: ...


@dataclass
class PerSeed:
    """Measurements computed by a target itself: ``data[group][seed][metric]``."""

    data: Mapping[str, Mapping[int, Mapping[str, float]]] = field(default_factory=dict)

    def values(self, label: str, key: str) -> list[float]:
        rows = self.data.get(label, {})
        return [rows[s][key] for s in sorted(rows) if rows[s].get(key) is not None]

    def paired(self, a: str, b: str, key: str) -> tuple[list[float], list[float]]:
        rows_a, rows_b = self.data.get(a, {}), self.data.get(b, {})
        seeds = sorted(
            s
            for s in rows_a
            if s in rows_b and rows_a[s].get(key) is not None and rows_b[s].get(key) is not None
        )
        return [rows_a[s][key] for s in seeds], [rows_b[s][key] for s in seeds]


def paper_text(paper: Paper, context: Sequence[Paper] = ()) -> str:
    """The report's "paper" cell: the judged figure, then the quoted ones."""
    quoted = "; ".join(c.describe() for c in context)
    return paper.describe() + (f"; for context: {quoted}" if quoted else "")


def judge(specs: Sequence[Spec], measured: Measurements) -> list[Claim]:
    """One report row per spec, in order, each with at most one verdict."""
    return [judge_one(spec, measured) for spec in specs]


def judge_one(spec: Spec, measured: Measurements) -> Claim:
    """The row of one spec (see :func:`judge`)."""
    if isinstance(spec, Untestable):
        return not_testable(spec.claim, spec.paper.describe(), spec.why)
    if isinstance(spec, Below):
        values = measured.values(spec.group, spec.metric)
        return bound_claim(
            spec.claim, spec.paper.describe(), values, below=spec.threshold, digits=spec.digits
        )
    row = paired_claim(
        spec.claim,
        paper_text(spec.paper, spec.context),
        *measured.paired(spec.a, spec.b, spec.metric),
        expect=spec.sign,
        paper_effect=spec.paper.effect,
        digits=spec.digits,
        scale=spec.scale,
        unit=spec.unit,
    )
    if spec.decided_by is not None:
        row.verdict = f"decided by {spec.decided_by}"
    return row
