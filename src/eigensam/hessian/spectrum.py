"""Spectral density and trace of a symmetric operator from matrix-vector products alone.

- :func:`slq_density`: stochastic Lanczos quadrature (Golub & Meurant 2010; Ubaru, Chen & Saad
  2017; Ghorbani, Krishnan & Xiao 2019), the estimate behind Hessian spectrum plots.
- :func:`hutchinson_trace` (Hutchinson 1990) and :func:`hutchpp_trace` (Hutch++: Meyer, Musco,
  Musco & Woodruff 2021).

``matvec`` maps a flat 1-D tensor of length ``dim`` (``dtype``/``device``) to ``H v``. With
``algebra`` (a :class:`~eigensam.hessian.eigen.VectorAlgebra` such as a sharded
:class:`~eigensam.parallel.ParamLayout`) the vectors are this rank's pieces of vectors of length
``dim``: every probe is drawn whole (the one process's draw) and cut to the piece, and every sum
over entries is global, so the estimates equal the one process's up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from eigensam.hessian.eigen import (
    MatVec,
    VectorAlgebra,
    WholeVectors,
    check_positive_int,
    lanczos_tridiagonal,
    orthogonalize,
)

PROBES = ("rademacher", "gaussian")


def _rademacher(
    dim: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
    algebra: VectorAlgebra | None = None,
) -> Tensor:
    """A vector of independent ±1 entries (drawn on the CPU, so results do not depend on
    device), cut to this rank's piece by ``algebra``."""
    signs = torch.randint(0, 2, (dim,), generator=generator, device="cpu").to(dtype) * 2 - 1
    return signs.to(device) if algebra is None else algebra.shard(signs.to(device))


def _algebra(dim: int, algebra: VectorAlgebra | None) -> VectorAlgebra:
    """``algebra`` (checked to describe vectors of length ``dim``), or whole vectors."""
    if algebra is None:
        return WholeVectors(dim)
    if algebra.global_numel != dim:
        raise ValueError(
            f"dim must be the whole vectors' length {algebra.global_numel} (the algebra's "
            f"global_numel), got {dim}"
        )
    return algebra


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


def _apply(matvec: MatVec, v: Tensor, algebra: VectorAlgebra) -> Tensor:
    hv = matvec(v)
    if not isinstance(hv, Tensor) or hv.shape != v.shape:
        shape = tuple(hv.shape) if isinstance(hv, Tensor) else type(hv).__name__
        raise ValueError(f"matvec must return a tensor of shape {tuple(v.shape)}, got {shape}")
    if not algebra.all_true(bool(torch.isfinite(hv).all())):
        raise FloatingPointError("Hessian-vector product is not finite")
    return hv


# --------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature
# --------------------------------------------------------------------------------------------


@dataclass
class SpectralDensity:
    """Gauss quadrature rules ``{(θ_j, τ_j)}``, one per probe, for the spectral density of ``H``.

    For a unit probe ``v`` and ``m`` Lanczos steps, ``θ_j`` are the eigenvalues of the Lanczos
    tridiagonal ``T_m`` and ``τ_j = (e_1ᵀ s_j)²`` the squared first components of its eigenvectors,
    so that ``vᵀ f(H) v ≈ Σ_j τ_j f(θ_j)`` (exact for polynomials of degree < 2m). Averaged over
    Rademacher or Gaussian probes, ``E[vᵀ f(H) v] = tr f(H) / dim``: the rules estimate the
    normalized density ``φ(t) = (1/dim) Σ_i δ(t − λ_i)``. ``nodes`` and ``weights`` are float64 CPU
    tensors; each probe's weights sum to 1.
    """

    nodes: list[Tensor]
    weights: list[Tensor]
    num_matvecs: int
    dim: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_probes(self) -> int:
        return len(self.nodes)

    def density(self, grid: Tensor | Sequence[float], sigma: float) -> Tensor:
        """``φ_σ(t) = (1/P) Σ_p Σ_j τ_pj · N(t; θ_pj, σ²)`` on ``grid`` (Gaussian smoothing, width
        ``sigma`` > 0, in eigenvalue units). Integrates to 1 over the real line."""
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        t = torch.as_tensor(grid, dtype=torch.float64).reshape(-1, 1)
        total = torch.zeros(t.shape[0], dtype=torch.float64)
        for nodes, weights in zip(self.nodes, self.weights, strict=True):
            z = (t - nodes.reshape(1, -1)) / sigma
            total += (torch.exp(-0.5 * z**2) * weights.reshape(1, -1)).sum(dim=1)
        total /= self.num_probes * sigma * math.sqrt(2 * math.pi)
        return total.reshape(torch.as_tensor(grid).shape)

    def moment(self, order: int) -> float:
        """``(1/P) Σ_p Σ_j τ_pj θ_pj^order``, an estimate of ``tr(H^order) / dim`` (order ≥ 0)."""
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"order must be an int >= 0, got {order!r}")
        values = [
            float((w * n**order).sum()) for n, w in zip(self.nodes, self.weights, strict=True)
        ]
        return sum(values) / self.num_probes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary of the quadrature rules."""
        return {
            "nodes": [n.tolist() for n in self.nodes],
            "weights": [w.tolist() for w in self.weights],
            "num_matvecs": self.num_matvecs,
            "num_probes": self.num_probes,
            "dim": self.dim,
            **self.extra,
        }


def slq_density(
    matvec: MatVec,
    dim: int,
    num_probes: int = 1,
    num_iters: int = 90,
    generator: torch.Generator | None = None,
    *,
    probe: str = "rademacher",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    algebra: VectorAlgebra | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: for each of ``num_probes`` unit probes ``v`` (Rademacher
    ``z/√dim`` or normalized Gaussian), run ``m = min(num_iters, dim)`` Lanczos steps from ``v``
    (:func:`~eigensam.hessian.eigen.lanczos_tridiagonal`), and keep the Ritz values ``θ_j`` and
    weights ``τ_j = (e_1ᵀ s_j)²`` of ``T_m = S diag(θ) Sᵀ`` (Ubaru et al. 2017; Ghorbani et al.
    2019). Costs at most ``num_probes · m`` products and keeps ``m`` vectors in memory.
    """
    check_positive_int("dim", dim)
    check_positive_int("num_probes", num_probes)
    check_positive_int("num_iters", num_iters)
    _check_dtype(dtype)
    pieces = _algebra(dim, algebra)
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    nodes, weights, num_matvecs = [], [], 0
    for _ in range(num_probes):
        if probe == "rademacher":
            v = _rademacher(dim, generator, dtype, device, algebra)
        else:
            v = torch.randn(dim, generator=generator, dtype=dtype, device="cpu").to(device)
            v = pieces.shard(v)
        alphas, betas, used = lanczos_tridiagonal(matvec, v, num_iters, pieces)
        tridiagonal = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
        theta, vectors = torch.linalg.eigh(tridiagonal)
        nodes.append(theta)
        weights.append(vectors[0] ** 2)
        num_matvecs += used
    extra = {"num_iters": num_iters, "probe": probe}
    return SpectralDensity(nodes, weights, num_matvecs, dim, extra)


# --------------------------------------------------------------------------------------------
# Trace
# --------------------------------------------------------------------------------------------


@dataclass
class TraceEstimate:
    """A stochastic trace estimate: ``estimate`` = mean of ``samples``; ``std_error`` = sample
    standard deviation / √n (NaN for one sample); ``num_matvecs`` products used."""

    estimate: float
    std_error: float
    num_matvecs: int
    samples: list[float]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary (a NaN ``std_error`` becomes ``None``)."""
        return {
            "estimate": self.estimate,
            "std_error": self.std_error if math.isfinite(self.std_error) else None,
            "num_matvecs": self.num_matvecs,
            "samples": list(self.samples),
        }


def _from_samples(samples: list[float], num_matvecs: int) -> TraceEstimate:
    values = torch.tensor(samples, dtype=torch.float64)
    n = len(samples)
    std_error = float(values.std(correction=1)) / math.sqrt(n) if n > 1 else float("nan")
    return TraceEstimate(float(values.mean()), std_error, num_matvecs, samples)


def hutchinson_trace(
    matvec: MatVec,
    dim: int,
    num_samples: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    algebra: VectorAlgebra | None = None,
) -> TraceEstimate:
    """Hutchinson's estimator ``tr(H) ≈ (1/n) Σ_i z_iᵀ H z_i`` with ``n = num_samples``
    Rademacher probes ``z_i`` (Hutchinson 1990); one product per sample."""
    check_positive_int("dim", dim)
    check_positive_int("num_samples", num_samples)
    _check_dtype(dtype)
    pieces = _algebra(dim, algebra)
    samples = []
    for _ in range(num_samples):
        z = _rademacher(dim, generator, dtype, device, algebra)
        samples.append(float(pieces.dot(z.double(), _apply(matvec, z, pieces).double())))
    return _from_samples(samples, num_samples)


def hutchpp_trace(
    matvec: MatVec,
    dim: int,
    num_matvecs: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    algebra: VectorAlgebra | None = None,
) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021) with a budget of ``m = num_matvecs ≥ 3`` products:
    ``tr(H) ≈ tr(QᵀHQ) + (1/n) Σ_i g_iᵀ (I − QQᵀ) H (I − QQᵀ) g_i``, where ``Q`` is an orthonormal
    basis of ``H S`` for ``s = ⌊m/3⌋`` Rademacher columns ``S`` (``2s`` products for ``HS`` and
    ``HQ``) and the ``n = m − 2s`` Rademacher probes ``g_i`` use the rest.

    Exact when ``rank(H) ≤ s``; its error is dominated by the tail of the spectrum, so it beats
    Hutchinson at equal budget when the spectrum decays fast. ``samples`` are
    ``tr(QᵀHQ) + g_iᵀ(I − QQᵀ)H(I − QQᵀ)g_i``, so ``std_error`` is that of the Hutchinson part.
    ``Q`` comes from Gram–Schmidt applied twice with global dot products (vectors may be
    sharded); a column of ``HS`` that is numerically dependent on the previous ones
    (``rank(H) < s``) is dropped, which keeps the estimate unbiased and saves its product.
    """
    check_positive_int("dim", dim)
    check_positive_int("num_matvecs", num_matvecs)
    if num_matvecs < 3:
        raise ValueError(f"num_matvecs must be >= 3 for Hutch++, got {num_matvecs}")
    _check_dtype(dtype)
    pieces = _algebra(dim, algebra)
    sketch = min(num_matvecs // 3, dim)
    num_samples = num_matvecs - 2 * sketch
    s = [_rademacher(dim, generator, dtype, device, algebra) for _ in range(sketch)]
    q = _orthonormal_rows([_apply(matvec, column, pieces) for column in s], pieces)
    low_rank = sum(
        float(pieces.dot(row.double(), _apply(matvec, row, pieces).double())) for row in q
    )
    samples = []
    for _ in range(num_samples):
        g = orthogonalize(_rademacher(dim, generator, dtype, device, algebra), q, pieces)
        samples.append(low_rank + float(pieces.dot(g.double(), _apply(matvec, g, pieces).double())))
    return _from_samples(samples, sketch + len(q) + num_samples)


def _orthonormal_rows(vectors: list[Tensor], algebra: VectorAlgebra) -> Tensor:
    """An orthonormal basis (rows) of the span of ``vectors`` by Gram–Schmidt applied twice;
    a vector whose part orthogonal to the previous ones is below ``√eps`` of its norm is
    dropped (numerically dependent)."""
    rows = vectors[0].new_empty(0, vectors[0].numel())
    tolerance = math.sqrt(torch.finfo(vectors[0].dtype).eps)
    for vector in vectors:
        length = float(algebra.norm(vector.double()))
        rest = orthogonalize(vector, rows, algebra)
        norm = float(algebra.norm(rest.double()))
        if norm > tolerance * length:
            rows = torch.cat([rows, (rest / norm)[None]])
    return rows
