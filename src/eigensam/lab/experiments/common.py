"""What every reproduction target shares: its plan (groups of runs over seeds), the results it
reads back, and small helpers for their summaries."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.config import TrainConfig
from eigensam.lab.experiments.report import Section
from eigensam.lab.experiments.runs import Scale, load_records, load_summary

# A plan: group label (a method, an α, a p) -> its runs, one per seed, in seed order.
Plan = dict[str, list[TrainConfig]]


@dataclass
class Target:
    """A reproduction target: ``plan(scale)`` lists its runs, ``analyze(scale, plan, out)``
    writes its JSON and figures under ``out`` and returns its report section. ``min_seeds`` is
    the number of seeds its confidence intervals need. ``computes``: its analysis does more than
    read its runs back (trains or simulates on its own, measures Hessians of the trained runs)
    and caches what it computes, so ``eigensam reproduce`` runs it in the training pool as soon
    as its runs are finished. ``held_out``: its runs are evaluated on the held-out images
    (:func:`~eigensam.lab.experiments.convergence.held_out_fit`), each in the pool as soon as
    it is finished. ``specs``: the claims it judges
    (:mod:`~eigensam.lab.experiments.claims`), when they are fixed."""

    name: str
    title: str
    plan: Callable[[Scale], Plan]
    analyze: Callable[[Scale, Plan, Path], Section]
    min_seeds: int = 2
    computes: bool = False
    held_out: bool = False
    specs: tuple[Any, ...] = ()


def seeds_plan(
    scale: Scale, groups: dict[str, dict[str, Any]], file: str | None = None, short: bool = False
) -> Plan:
    """A plan with one run per seed of ``scale`` for each group's config fields (on the short
    CPU scale with ``short``)."""
    return {
        label: [scale.config(seed, file=file, short=short, **fields) for seed in scale.seeds]
        for label, fields in groups.items()
    }


def sweep_plan(
    scale: Scale, groups: dict[str, dict[str, Any]], shared: set[str], file: str | None = None
) -> Plan:
    """A sweep's plan: the ``shared`` groups (table1's settings) with every seed, the others with
    :attr:`Scale.sweep_seeds`."""
    return {
        label: [
            scale.config(seed, file=file, **fields)
            for seed in (scale.seeds if label in shared else scale.sweep_seeds)
        ]
        for label, fields in groups.items()
    }


@dataclass
class Results:
    """Summaries and metric records of a plan's finished runs; runs that diverged or are
    missing are left out of ``summaries``/``records`` and listed in ``failed``."""

    summaries: dict[str, list[dict[str, Any]]]
    records: dict[str, list[list[tracking.Record]]]
    failed: list[str]

    @classmethod
    def load(cls, plan: Plan) -> Results:
        summaries: dict[str, list[dict[str, Any]]] = {}
        records: dict[str, list[list[tracking.Record]]] = {}
        failed = []
        for label, configs in plan.items():
            summaries[label], records[label] = [], []
            for config in configs:
                summary = load_summary(config)
                if summary.get("status") != "finished":
                    failed.append(f"{config.run_dir.name} ({summary.get('status')})")
                    continue
                summaries[label].append(summary)
                records[label].append(load_records(config))
        return cls(summaries, records, failed)

    def derive(
        self, key: str, compute: Callable[[Sequence[tracking.Record]], float | None]
    ) -> None:
        """Add ``key`` = ``compute(records)`` to every finished run's summary (left out where
        it gives None): a per-run metric the claims can name like a summary's."""
        for label, summaries in self.summaries.items():
            for summary, records in zip(summaries, self.records[label], strict=True):
                value = compute(records)
                if value is not None:
                    summary[key] = value

    def values(self, label: str, key: str) -> list[float]:
        return [s[key] for s in self.summaries[label] if s.get(key) is not None]

    def paired(self, a: str, b: str, key: str) -> tuple[list[float], list[float]]:
        """Values of ``key`` for the seeds both groups finished, in seed order."""
        by_seed_a = {s["seed"]: s.get(key) for s in self.summaries[a]}
        by_seed_b = {s["seed"]: s.get(key) for s in self.summaries[b]}
        seeds = sorted(
            s for s in by_seed_a if by_seed_b.get(s) is not None and by_seed_a[s] is not None
        )
        return [by_seed_a[s] for s in seeds], [by_seed_b[s] for s in seeds]

    def failure_note(self) -> str:
        if not self.failed:
            return ""
        return f"\nRuns left out (did not finish): {', '.join(self.failed)}.\n"


def command(target: str, scale: Scale) -> str:
    seeds = ",".join(map(str, scale.seeds))
    return f"eigensam reproduce {target} --scale {scale.name} --seeds {seeds}"


def epoch_value(records: Sequence[tracking.Record], epoch: int, key: str) -> float | None:
    for record in records:
        if record.get("kind") == "eval" and record.get("epoch") == epoch:
            return record.get(key)
    return None
