"""Curvature of a loss at given parameters: Hessian-vector products, eigenpairs, trace, density.

Low level: :class:`HessianOperator` (one closure), :class:`DatasetHessian` (a model over a fixed
list of batches), :class:`GGNOperator` (the generalized Gauss-Newton matrix of a loss
``ℓ(f(x), y)``), :class:`BlockOperator` (any of them restricted to a block of parameters), the
solvers :func:`power_iteration`, :func:`lanczos`,
:func:`deflated_power_iteration`, :func:`slq_density`, :func:`hutchinson_trace`,
:func:`hutchpp_trace`, :class:`EigenTracker` used by the optimizers, and :func:`taylor_terms`
(``∇f, ∇²f·u, ∇³f(u, u)``, used by the SDE simulator).
High level (:mod:`eigensam.hessian.analysis`): :func:`top_eigenvalues`, :func:`trace` and
:func:`density`. The reports that write them to files are in :mod:`eigensam.lab.curvature_reports`.

This package needs only torch (the ``[lab]`` extra is for training, reports and the CLI).
"""

from eigensam.hessian.analysis import density, top_eigenvalues, trace
from eigensam.hessian.blocks import BlockOperator, layer_blocks, select_parameters
from eigensam.hessian.dataset import DatasetHessian, NondeterministicHessianError
from eigensam.hessian.eigen import (
    EigenResult,
    deflated_power_iteration,
    lanczos,
    lanczos_tridiagonal,
    power_iteration,
)
from eigensam.hessian.ggn import GGNOperator, NotLossOfOutputsError
from eigensam.hessian.hvp import DoubleBackwardError, HessianOperator
from eigensam.hessian.metrics import abs_cosine, align, cosine
from eigensam.hessian.spectrum import (
    SpectralDensity,
    TraceEstimate,
    hutchinson_trace,
    hutchpp_trace,
    slq_density,
)
from eigensam.hessian.taylor import HigherOrderUnsupportedError, TaylorTerms, taylor_terms
from eigensam.hessian.tracker import EigenTracker

__all__ = [
    "BlockOperator",
    "DatasetHessian",
    "DoubleBackwardError",
    "EigenResult",
    "EigenTracker",
    "GGNOperator",
    "HessianOperator",
    "HigherOrderUnsupportedError",
    "NondeterministicHessianError",
    "NotLossOfOutputsError",
    "SpectralDensity",
    "TaylorTerms",
    "TraceEstimate",
    "abs_cosine",
    "align",
    "cosine",
    "deflated_power_iteration",
    "density",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "lanczos_tridiagonal",
    "layer_blocks",
    "power_iteration",
    "select_parameters",
    "slq_density",
    "taylor_terms",
    "top_eigenvalues",
    "trace",
]
