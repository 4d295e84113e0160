"""Curvature estimators of a Hessian operator: top eigenvalues, trace, spectral density.

The three estimators are thin wrappers that fix the dimension, dtype, device and random
generator of an operator and call the solvers of :mod:`eigensam.hessian.eigen` and
:mod:`eigensam.hessian.spectrum`. ``op`` is a :class:`~eigensam.hessian.dataset.DatasetHessian`,
a :class:`~eigensam.hessian.hvp.HessianOperator` (open, i.e. inside its ``with`` block), anything
with ``matvec``, ``dim``, ``dtype`` and ``device``, or a symmetric matrix (a square tensor).
An operator with a ``layout`` (a :class:`~eigensam.hessian.hvp.HessianOperator` on an FSDP2
model: vectors sharded like the parameters, ``dim`` this rank's share) is solved with global
sums over the shards: every rank runs the estimator, with the same random draws as one process
on the whole vectors, and gets the same result; eigenvectors are this rank's shards.
:func:`density_curve` smooths an SLQ density for plotting and :func:`estimates_by_step` gives a
solver's estimate at every budget. The reports that write JSON and PNG files from them live in
:mod:`eigensam.lab.curvature_reports`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from eigensam.hessian.eigen import (
    EigenResult,
    MatVec,
    VectorAlgebra,
    WholeVectors,
    check_positive_int,
    deflated_power_iteration,
    lanczos,
)
from eigensam.hessian.spectrum import (
    SpectralDensity,
    TraceEstimate,
    hutchinson_trace,
    hutchpp_trace,
    slq_density,
)

EIGEN_METHODS = ("lanczos", "power")
TRACE_METHODS = ("hutchpp", "hutchinson")
# Gaussian smoothing of the plotted density, as a fraction of the width of the Ritz-value range.
DENSITY_SIGMA_FRACTION = 0.005
DENSITY_GRID_POINTS = 1000


class Operator(Protocol):
    """A symmetric linear operator on flat vectors of length ``dim``."""

    @property
    def dim(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matvec(self, v: Tensor) -> Tensor: ...


def _operator(
    op: Operator | Tensor,
) -> tuple[MatVec, int, torch.dtype, torch.device, VectorAlgebra]:
    """``(matvec, dim, dtype, device, algebra)`` of an operator or a square matrix; ``dim`` is
    the whole vectors' length, ``algebra`` the operator's ``layout`` when it has one (sharded
    vectors), else :class:`~eigensam.hessian.eigen.WholeVectors`."""
    if isinstance(op, Tensor):
        if op.dim() != 2 or op.shape[0] != op.shape[1] or not op.is_floating_point():
            raise ValueError(
                f"op given as a tensor must be a square floating-point matrix, got shape "
                f"{tuple(op.shape)} and {op.dtype}"
            )
        return (lambda v: op @ v), op.shape[0], op.dtype, op.device, WholeVectors(op.shape[0])
    missing = [name for name in ("matvec", "dim", "dtype", "device") if not hasattr(op, name)]
    if missing or not callable(op.matvec):
        raise TypeError(
            "op must be a Hessian operator (with matvec, dim, dtype and device, e.g. a "
            f"DatasetHessian) or a square matrix, got {type(op).__name__} (missing {missing})"
        )
    algebra = getattr(op, "layout", None) or WholeVectors(op.dim)
    return op.matvec, algebra.global_numel, op.dtype, op.device, algebra


def seeded_generator(seed: object) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def check_tolerance(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------


def top_eigenvalues(
    op: Operator | Tensor,
    k: int = 1,
    *,
    method: str = "lanczos",
    which: str | None = None,
    num_iters: int = 100,
    tol: float | None = 1e-3,
    seed: int = 0,
    v0: Tensor | None = None,
) -> list[EigenResult]:
    """The ``k`` top eigenpairs of ``op``, each with its signed eigenvalue and residual
    ``‖Hv − λv‖``.

    ``method="lanczos"`` (default): :func:`~eigensam.hessian.eigen.lanczos` with full
    reorthogonalization, at most ``num_iters`` products, stopping once every wanted pair has
    ``residual ≤ tol·|λ|`` (the eigenvalue is then within ``tol²·|λ|²/δ`` of the truth, ``δ`` the
    gap to the rest of the spectrum; ``tol=None`` uses all ``num_iters`` products, for float64
    precision); ``which`` is "LA" (algebraically largest, default), "SA" or "LM".
    Keeps ``num_iters`` vectors of length ``dim`` in memory.
    ``method="power"``: :func:`~eigensam.hessian.eigen.deflated_power_iteration`, at most
    ``num_iters`` products per pair; it finds the largest *magnitude* ("LM" only).
    The start vector is ``v0`` or a random unit vector from a generator seeded with ``seed``.
    """
    matvec, dim, dtype, device, algebra = _operator(op)
    check_choice("method", method, EIGEN_METHODS)
    generator = seeded_generator(seed)
    start: Tensor | int = dim if v0 is None else v0
    if method == "lanczos":
        which = "LA" if which is None else which
        return lanczos(
            matvec,
            start,
            num_iters,
            k,
            which,
            tol,
            generator,
            dtype=dtype,
            device=device,
            algebra=algebra,
        )
    if which not in (None, "LM"):
        raise ValueError(
            f"which={which!r} needs method='lanczos'; power iteration finds the eigenvalues of "
            "largest magnitude (which='LM')"
        )
    return deflated_power_iteration(
        matvec, start, k, num_iters, tol, generator, dtype=dtype, device=device, algebra=algebra
    )


def trace(
    op: Operator | Tensor,
    num_matvecs: int = 100,
    *,
    method: str = "hutchpp",
    seed: int = 0,
) -> TraceEstimate:
    """``tr(H)`` from ``num_matvecs`` products with a standard error: Hutch++ (default;
    ``num_matvecs ≥ 3``) or Hutchinson with Rademacher probes from a generator seeded with
    ``seed``."""
    matvec, dim, dtype, device, algebra = _operator(op)
    check_choice("method", method, TRACE_METHODS)
    estimator = hutchpp_trace if method == "hutchpp" else hutchinson_trace
    generator = seeded_generator(seed)
    return estimator(
        matvec, dim, num_matvecs, generator, dtype=dtype, device=device, algebra=algebra
    )


def density(
    op: Operator | Tensor,
    num_iters: int = 90,
    num_probes: int = 1,
    *,
    seed: int = 0,
) -> SpectralDensity:
    """Spectral density of ``op`` by stochastic Lanczos quadrature: ``num_probes`` Rademacher
    probes (generator seeded with ``seed``), ``num_iters`` Lanczos steps each."""
    matvec, dim, dtype, device, algebra = _operator(op)
    generator = seeded_generator(seed)
    return slq_density(
        matvec, dim, num_probes, num_iters, generator, dtype=dtype, device=device, algebra=algebra
    )


def density_curve(
    spectral_density: SpectralDensity,
    num_points: int = DENSITY_GRID_POINTS,
    sigma_fraction: float = DENSITY_SIGMA_FRACTION,
) -> tuple[Tensor, Tensor, float]:
    """``(grid, φ_σ(grid), σ)``: the Gaussian-smoothed SLQ density on ``num_points`` points
    spanning the Ritz values plus a margin, with ``σ = sigma_fraction ·`` (width of their range)."""
    check_positive_int("num_points", num_points)
    nodes = torch.cat(spectral_density.nodes)
    low, high = float(nodes.min()), float(nodes.max())
    width = high - low if high > low else max(abs(high), 1.0)
    sigma = sigma_fraction * width
    margin = 0.02 * width + 4 * sigma
    grid = torch.linspace(low - margin, high + margin, num_points, dtype=torch.float64)
    return grid, spectral_density.density(grid, sigma), sigma


def estimates_by_step(
    solve: Callable[[MatVec, int], EigenResult], matvec: MatVec, max_steps: int
) -> list[EigenResult]:
    """The estimate ``solve(matvec, t)`` for every budget ``t = 1..max_steps``, paying for only
    ``max_steps`` products.

    ``solve(matvec, num_iters)`` must be deterministic (fixed start vector and generator): a
    solver run with budget ``t`` then asks for the same first ``t`` products as the run with
    ``max_steps``, which is made once and recorded; the shorter runs replay the recorded
    products. A replayed input that differs from the recorded one by more than ``1e-5``
    (relative; it should not, beyond rounding) is multiplied afresh instead. A solver that stops
    early (invariant subspace) repeats its last estimate.
    """
    recorded: list[tuple[Tensor, Tensor]] = []

    def recording(v: Tensor) -> Tensor:
        hv = matvec(v)
        recorded.append((v.detach().clone(), hv.detach().clone()))
        return hv

    final = solve(recording, max_steps)
    results = []
    for budget in range(1, max_steps + 1):
        if budget >= len(recorded):
            results.append(final)
            continue
        replay = iter(recorded)

        def replayed(v: Tensor, replay: Any = replay) -> Tensor:
            x, hx = next(replay)
            if float((x - v).norm()) <= 1e-5 * float(v.norm()):
                return hx
            return matvec(v)

        results.append(solve(replayed, budget))
    return results
