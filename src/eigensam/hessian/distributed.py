"""Deprecated alias of :mod:`eigensam.parallel`, where this module moved; the alias goes in the
next release."""

import sys
import warnings

from eigensam import parallel

warnings.warn(
    "eigensam.hessian.distributed moved to eigensam.parallel; the old name will be removed in the "
    "next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = parallel
