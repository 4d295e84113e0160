"""Sharpness-aware optimizers: SAM/ASAM, Eigen-SAM, X-SAM and the paper's counterexamples."""

from eigensam.optim.counterexamples import EGR, ReverseSAM
from eigensam.optim.eigen_sam import EigenSAM
from eigensam.optim.sam import SAM
from eigensam.optim.x_sam import XSAM

__all__ = ["EGR", "SAM", "EigenSAM", "ReverseSAM", "XSAM"]
