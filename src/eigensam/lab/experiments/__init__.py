"""Experiments built from training runs: ``eigensam compare`` (:mod:`.compare`) and the paper's
reproduction suite behind ``eigensam reproduce`` (:mod:`.reproduce`, one module per target)."""

from eigensam.lab.experiments.compare import (
    COMPARISON_PLOT,
    COMPARISON_TABLE,
    DEFAULT_OVERRIDES,
    Comparison,
    compare,
    plan_comparison,
)

__all__ = [
    "COMPARISON_PLOT",
    "COMPARISON_TABLE",
    "DEFAULT_OVERRIDES",
    "Comparison",
    "compare",
    "plan_comparison",
]
