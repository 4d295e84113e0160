"""Alignment and accuracy measures for perturbations and eigenvector estimates.

Vectors are flat tensors, or sequences of tensors (e.g. one per parameter) that are flattened and
concatenated. All results are computed in float64 and returned as Python floats. ``algebra``
(optional, a :class:`~eigensam.hessian.eigen.VectorAlgebra` such as a sharded
:class:`~eigensam.parallel.ParamLayout`) makes norms and dot products global for vectors of which
each rank holds its piece (FSDP2); every rank then gets the same value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from eigensam.hessian.eigen import MatVec, VectorAlgebra, WholeVectors

Vector = Tensor | Sequence[Tensor]


def _flat(x: Vector, name: str) -> Tensor:
    if isinstance(x, Tensor):
        flat = x.reshape(-1)
    elif isinstance(x, Sequence) and x and all(isinstance(t, Tensor) for t in x):
        flat = torch.cat([t.detach().reshape(-1).to(x[0].device) for t in x])
    else:
        raise TypeError(f"{name} must be a tensor or a non-empty sequence of tensors, got {x!r}")
    if not flat.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {flat.dtype}")
    return flat.detach().double()


def _unit(x: Tensor, name: str, algebra: VectorAlgebra | None = None) -> Tensor:
    norm = float(x.norm() if algebra is None else algebra.norm(x))
    if not math.isfinite(norm) or norm == 0:
        raise ValueError(f"{name} must be a finite nonzero vector, got norm {norm}")
    return x / norm


def _pair(
    a: Vector, b: Vector, names: tuple[str, str], algebra: VectorAlgebra | None
) -> tuple[Tensor, Tensor]:
    fa, fb = _flat(a, names[0]), _flat(b, names[1])
    if fa.shape != fb.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same number of elements, "
            f"got {fa.numel()} and {fb.numel()}"
        )
    return _unit(fa, names[0], algebra), _unit(fb.to(fa.device), names[1], algebra)


def cosine(a: Vector, b: Vector, algebra: VectorAlgebra | None = None) -> float:
    """``cos(a, b) = ⟨a, b⟩ / (‖a‖ ‖b‖)``, in [−1, 1]."""
    ua, ub = _pair(a, b, ("a", "b"), algebra)
    dot = torch.dot(ua, ub) if algebra is None else algebra.dot(ua, ub)
    return max(-1.0, min(1.0, float(dot)))


def abs_cosine(a: Vector, b: Vector, algebra: VectorAlgebra | None = None) -> float:
    """``|cos(a, b)|``, in [0, 1]: alignment up to the sign of either vector."""
    return abs(cosine(a, b, algebra))


def align(eps: Vector, v1: Vector, algebra: VectorAlgebra | None = None) -> float:
    """``Align(ε, v₁) = 1 − min_{s=±1} ‖ε/‖ε‖ − s · v₁/‖v₁‖‖`` (paper §4.3), in [1 − √2, 1].

    Equals ``1 − √(2 − 2 |cos(ε, v₁)|)``; computed from the difference directly, which keeps full
    precision for nearly aligned vectors. 1 means ε ∥ ±v₁; orthogonal vectors give 1 − √2.
    """
    ue, uv = _pair(eps, v1, ("eps", "v1"), algebra)
    norm = (algebra or WholeVectors(ue.numel())).norm
    distance = min(float(norm(ue - uv)), float(norm(ue + uv)))
    return 1.0 - distance


def residual(matvec: MatVec, v: Tensor, eigenvalue: float) -> float:
    """``‖H v̂ − λ v̂‖`` for ``v̂ = v / ‖v‖`` (one product, in ``v``'s dtype)."""
    if not isinstance(v, Tensor) or not v.is_floating_point():
        raise TypeError(f"v must be a floating-point tensor, got {v!r}")
    if not (isinstance(eigenvalue, int | float) and math.isfinite(eigenvalue)):
        raise ValueError(f"eigenvalue must be a finite number, got {eigenvalue!r}")
    unit = _unit(v.detach().double(), "v")
    hv = matvec(unit.to(v.dtype))
    if not isinstance(hv, Tensor) or hv.shape != v.shape:
        shape = tuple(hv.shape) if isinstance(hv, Tensor) else type(hv).__name__
        raise ValueError(f"matvec must return a tensor of shape {tuple(v.shape)}, got {shape}")
    return float((hv.double() - eigenvalue * unit).norm())
