"""Experiments built from training runs: the method comparison behind ``eigensam compare``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.config import TrainConfig, check_same_run, config_from_dict, load_config
from eigensam.lab.engine.launch import barrier, is_main
from eigensam.lab.engine.train import Trainer
from eigensam.lab.engine.trained_model import training_data
from eigensam.lab.workloads.datasets import DataSplits

COMPARISON_TABLE = "comparison.md"
COMPARISON_PLOT = "comparison.png"
# TrainConfig defaults that a comparison changes: sharpness is tracked every k steps.
DEFAULT_OVERRIDES = {"track_every": 50}


def _unique(name: str, values: Sequence[Any]) -> None:
    if not values:
        raise ValueError(f"{name} must not be empty")
    repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
    if repeated:
        raise ValueError(f"{name} lists {', '.join(repeated)} more than once")


@dataclass
class Comparison:
    """A validated comparison: one configuration per (method, seed), run in
    ``<out>/<method>-seed<seed>/``, and the loaded data they share."""

    out: Path
    configs: dict[tuple[str, int], TrainConfig]
    data: DataSplits

    def run(self) -> str:
        """Train the runs that are not finished (continuing interrupted ones from their last
        checkpoint), then write ``comparison.md`` and ``comparison.png``; print and return the
        table."""
        summaries: dict[str, list[dict[str, Any]]] = {}
        records: dict[str, list[list[tracking.Record]]] = {}
        for number, ((method, seed), config) in enumerate(self.configs.items(), start=1):
            run_dir = config.run_dir
            summary_path = run_dir / tracking.SUMMARY_FILE
            if summary_path.is_file():
                summary = json.loads(summary_path.read_text(encoding="utf-8"))
                status = "already finished"
            else:
                resume = run_dir if (run_dir / tracking.CONFIG_FILE).is_file() else None
                summary = Trainer(config, resume, self.data).run()
                status = f"trained in {summary['train_seconds']:.0f} s"
            if is_main():
                print(
                    f"[{number}/{len(self.configs)}] {method} seed {seed}: {status}, "
                    f"test acc {summary['test_acc']:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
            summaries.setdefault(method, []).append(summary)
            metrics = tracking.read_records(run_dir / tracking.METRICS_FILE)
            records.setdefault(method, []).append(metrics)
        first = next(iter(self.configs.values()))
        seeds = sorted({seed for _, seed in self.configs})
        title = (
            f"{first.dataset}, {first.model} (width {first.width}), {first.epochs} epochs, "
            f"seeds {', '.join(map(str, seeds))}"
        )
        table = tracking.summary_table(summaries)
        if is_main():  # under torchrun, rank 0 writes the comparison
            self.out.mkdir(parents=True, exist_ok=True)
            tracking.write_text(self.out / COMPARISON_TABLE, f"# Comparison: {title}\n\n{table}")
            tracking.plot_curves(records, self.out / COMPARISON_PLOT, f"{title} (mean over seeds)")
            print(table, end="")
        barrier()
        return table


def plan_comparison(
    dataset: str,
    model: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    epochs: int,
    out: Path | str = "runs/compare",
    **overrides: Any,
) -> Comparison:
    """Validate every (method, seed) configuration (``overrides`` are further
    :class:`TrainConfig` fields, on top of :data:`DEFAULT_OVERRIDES`) and load the data, before
    anything is trained.

    Runs already in ``out`` must have been started with the same configuration.
    """
    _unique("methods", methods)
    _unique("seeds", seeds)
    for reserved in ("method", "seed", "out_dir"):
        if reserved in overrides:
            raise ValueError(f"{reserved} is set per run by compare; do not pass it")
    out = Path(out)
    overrides = {**DEFAULT_OVERRIDES, **overrides}
    configs = {}
    for method in methods:
        for seed in seeds:
            config = config_from_dict(
                {
                    **overrides,
                    "dataset": dataset,
                    "model": model,
                    "method": method,
                    "seed": seed,
                    "epochs": epochs,
                    "out_dir": str(out / f"{method}-seed{seed}"),
                }
            )
            snapshot = config.run_dir / tracking.CONFIG_FILE
            if snapshot.is_file():
                check_same_run(load_config(snapshot), config, config.run_dir)
            configs[method, seed] = config
    first = next(iter(configs.values()))
    return Comparison(out, configs, training_data(first))


def compare(
    dataset: str,
    model: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    epochs: int,
    out: Path | str = "runs/compare",
    **overrides: Any,
) -> str:
    """Train every method with every seed and compare them: ``<out>/comparison.md`` (test
    accuracy and loss, final λ₁, mean Align, training and tracking time; mean ± 95% CI over
    seeds) and ``<out>/comparison.png`` (test accuracy, train loss, λ₁ and Align over training,
    one line per method, mean over seeds). Finished runs are reused, interrupted ones
    continued, so an interrupted comparison resumes by calling it again. Returns the table."""
    return plan_comparison(dataset, model, methods, seeds, epochs, out, **overrides).run()
