"""Experiments built from training runs: ``eigensam compare`` (:mod:`.compare`) and the paper's
reproduction suite behind ``eigensam reproduce`` (:mod:`.reproduce`).

The machinery: runs and their pool (:mod:`.runs`), planning and shared summaries (:mod:`.common`,
:mod:`.pilot`, :mod:`.convergence`), the statistics of verdicts (:mod:`.verdicts`) and the report
(:mod:`.report`). The paper's targets, one module each, are in :mod:`.targets`."""

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
