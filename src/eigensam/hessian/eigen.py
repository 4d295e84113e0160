"""Eigenvalue solvers for symmetric linear operators given as matrix-vector products.

Every solver takes ``matvec``, a function mapping a flat 1-D tensor ``v`` to ``H v`` for a fixed
symmetric ``H`` (a Hessian operator from :mod:`eigensam.hessian.hvp`, or a plain matrix in tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass
class EigenResult:
    """One eigenpair estimate.

    ``eigenvalue`` is the signed Rayleigh quotient ``vᵀHv`` and ``residual`` is ``‖Hv − λv‖`` of
    the last vector that was multiplied by ``H``; ``num_matvecs`` counts products with ``H``.
    """

    eigenvalue: float
    eigenvector: Tensor
    residual: float
    num_matvecs: int
    converged: bool


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int ≥ 1, else raise naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def random_unit_vector(
    dim: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """A vector drawn uniformly from the unit sphere in ``dim`` dimensions."""
    v = torch.randn(dim, generator=generator, dtype=dtype, device="cpu").to(device)
    return v / v.norm()


def power_iteration(
    matvec: MatVec,
    v0: Tensor,
    num_iters: int,
    tol: float | None = None,
) -> EigenResult:
    """Power iteration (paper Algorithm 1): ``v ← Hv / ‖Hv‖`` repeated ``num_iters`` times.

    Converges to the eigenvector of the eigenvalue of largest *magnitude*, which may be negative;
    the returned ``eigenvalue`` keeps its sign. With ``tol`` set, stops early once the relative
    residual ``‖Hv − λv‖ / |λ|`` is at most ``tol``. The returned vector is the newest iterate
    ``Hv/‖Hv‖``, one step past the vector whose Rayleigh quotient and residual are reported, so each
    of the ``num_iters`` products improves the returned vector (warm start: pass the previous
    estimate as ``v0``).
    """
    check_positive_int("num_iters", num_iters)
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0 or None, got {tol}")
    norm = v0.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"v0 must be a finite nonzero vector, got norm {float(norm)}")
    v = v0 / norm
    eigenvalue, residual, converged = 0.0, float("inf"), False
    for i in range(1, num_iters + 1):
        hv = matvec(v)
        eigenvalue = float(torch.dot(v, hv))
        residual = float((hv - eigenvalue * v).norm())
        hv_norm = hv.norm()
        if not torch.isfinite(hv_norm):
            raise FloatingPointError(f"Hessian-vector product is not finite at iteration {i}")
        converged = tol is not None and residual <= tol * abs(eigenvalue)
        if hv_norm == 0:
            # v lies in the null space: it is an eigenvector with eigenvalue 0.
            return EigenResult(0.0, v, 0.0, i, True)
        v = hv / hv_norm
        if converged:
            return EigenResult(eigenvalue, v, residual, i, True)
    return EigenResult(eigenvalue, v, residual, num_iters, converged)
