"""eigensam: sharpness-aware optimizers that see the Hessian, and the tools to measure it.

Needs only torch: the optimizers (:mod:`eigensam.optim`) and the Hessian toolkit
(:mod:`eigensam.hessian`). Training, experiments, reports and the ``eigensam`` command are in
:mod:`eigensam.lab`, installed with the ``[lab]`` extra.
"""

from eigensam.optim import EGR, SAM, XSAM, EigenSAM, ReverseSAM

__all__ = ["EGR", "SAM", "XSAM", "EigenSAM", "ReverseSAM", "__version__"]
# The one place the version is written: pyproject.toml reads it (dynamic version).
__version__ = "0.1.0"
