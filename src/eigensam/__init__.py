"""eigensam: sharpness-aware optimizers that see the Hessian, and the tools to measure it."""

from eigensam.optim import EGR, SAM, XSAM, EigenSAM, ReverseSAM

__all__ = ["EGR", "SAM", "XSAM", "EigenSAM", "ReverseSAM"]
__version__ = "0.1.0"
