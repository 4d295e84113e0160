"""SAM against its second- and third-order SDEs (paper §3.3, §4, Eq. 1-5, Theorem 4.1, §6.1).

Modules: :mod:`eigensam.lab.sde.drifts` (the drifts, the SVAG step, and how the simulated
diffusion relates to the paper's Σ), :mod:`eigensam.lab.sde.trajectory` (one process and its
metrics), :mod:`eigensam.lab.sde.config` (:class:`SDEConfig`), :mod:`eigensam.lab.sde.weak_error`
(the statistics and tables), :mod:`eigensam.lab.sde.plots` (the figures) and
:mod:`eigensam.lab.sde.study` (:func:`run_sde` and the files it writes). The names the CLI and
the experiments use are re-exported here.
"""

from eigensam.lab.sde.config import SDEConfig
from eigensam.lab.sde.study import (
    COROLLARY_FILE,
    ETA_FILES,
    FIGURE_FILE,
    L_FILES,
    RESULTS_FILE,
    TABLE_FILE,
    run_sde,
)
from eigensam.lab.sde.trajectory import DivergedError

__all__ = [
    "COROLLARY_FILE",
    "ETA_FILES",
    "FIGURE_FILE",
    "L_FILES",
    "RESULTS_FILE",
    "TABLE_FILE",
    "DivergedError",
    "SDEConfig",
    "run_sde",
]
