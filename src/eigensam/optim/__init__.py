"""Sharpness-aware optimizers: SAM/ASAM, Eigen-SAM, X-SAM and the paper's counterexamples, and
:func:`take_step`, one step of any optimizer."""

from eigensam.optim.counterexamples import EGR, ReverseSAM
from eigensam.optim.eigen_sam import EigenSAM
from eigensam.optim.sam import SAM
from eigensam.optim.stepping import take_step
from eigensam.optim.x_sam import XSAM

__all__ = ["EGR", "SAM", "EigenSAM", "ReverseSAM", "XSAM", "take_step"]
