"""Eigenvalue solvers for symmetric linear operators given as matrix-vector products.

Every solver takes ``matvec``, a function mapping a flat 1-D tensor ``v`` to ``H v`` for a fixed
symmetric ``H`` (a Hessian operator from :mod:`eigensam.hessian.hvp`, or a plain matrix in tests).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

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


class VectorAlgebra(Protocol):
    """Sums over the entries of flat vectors that may be stored in pieces, such as
    :class:`~eigensam.parallel.ParamLayout`'s sharded vectors (each rank holds its rows of
    every vector, and sums run over every rank's piece): ``sum`` adds per-piece partial sums
    (a tensor of them, element-wise), ``dot`` and ``norm`` are global, ``all_true`` ANDs a flag
    over the pieces, ``global_numel`` is the whole vector's length and ``shard`` cuts a whole
    vector (the same on every rank) to this piece. :class:`WholeVectors` is the algebra of
    vectors held whole."""

    @property
    def global_numel(self) -> int: ...

    def sum(self, value: Tensor) -> Tensor: ...

    def dot(self, a: Tensor, b: Tensor) -> Tensor: ...

    def norm(self, a: Tensor) -> Tensor: ...

    def all_true(self, flag: bool) -> bool: ...

    def shard(self, vector: Tensor) -> Tensor: ...


class WholeVectors:
    """The :class:`VectorAlgebra` of vectors of length ``numel`` held whole by one process."""

    def __init__(self, numel: int):
        self.global_numel = numel

    def sum(self, value: Tensor) -> Tensor:
        return value

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.dot(a, b)

    def norm(self, a: Tensor) -> Tensor:
        return a.norm()

    def all_true(self, flag: bool) -> bool:
        return flag

    def shard(self, vector: Tensor) -> Tensor:
        return vector


def algebra_for(vector: Tensor, algebra: VectorAlgebra | None) -> VectorAlgebra:
    """``algebra``, or :class:`WholeVectors` of ``vector``'s length when it is None."""
    return WholeVectors(vector.numel()) if algebra is None else algebra


def random_piece(
    algebra: VectorAlgebra,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    """This piece of a standard normal vector of length ``algebra.global_numel`` drawn whole on
    the CPU from ``generator`` (one process's draw, the same on every rank)."""
    whole = torch.randn(algebra.global_numel, generator=generator, dtype=dtype, device="cpu")
    return algebra.shard(whole.to(device))


def power_iteration(
    matvec: MatVec,
    v0: Tensor,
    num_iters: int,
    tol: float | None = None,
    algebra: VectorAlgebra | None = None,
) -> EigenResult:
    """Power iteration (paper Algorithm 1): ``v ← Hv / ‖Hv‖`` repeated ``num_iters`` times.

    Converges to the eigenvector of the eigenvalue of largest *magnitude*, which may be negative;
    the returned ``eigenvalue`` keeps its sign. With ``tol`` set, stops early once the relative
    residual ``‖Hv − λv‖ / |λ|`` is at most ``tol``. The returned vector is the newest iterate
    ``Hv/‖Hv‖``, one step past the vector whose Rayleigh quotient and residual are reported, so each
    of the ``num_iters`` products improves the returned vector (warm start: pass the previous
    estimate as ``v0``). ``algebra`` (optional) supplies the dot product and norm, for vectors
    sharded over processes (FSDP2); by default they are ``torch.dot`` and ``Tensor.norm``.
    """
    check_positive_int("num_iters", num_iters)
    algebra = algebra_for(v0, algebra)
    dot, norm_of = algebra.dot, algebra.norm
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0 or None, got {tol}")
    norm = norm_of(v0)
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"v0 must be a finite nonzero vector, got norm {float(norm)}")
    v = v0 / norm
    eigenvalue, residual, converged = 0.0, float("inf"), False
    for i in range(1, num_iters + 1):
        hv = matvec(v)
        eigenvalue = float(dot(v, hv))
        residual = float(norm_of(hv.sub(v, alpha=eigenvalue)))
        hv_norm = norm_of(hv)
        if not torch.isfinite(hv_norm):
            raise FloatingPointError(f"Hessian-vector product is not finite at iteration {i}")
        converged = tol is not None and residual <= tol * abs(eigenvalue)
        if hv_norm == 0:
            # v lies in the null space: it is an eigenvector with eigenvalue 0.
            return EigenResult(0.0, v, 0.0, i, True)
        v = hv / hv_norm
        del hv  # not alive during the next product
        if converged:
            return EigenResult(eigenvalue, v, residual, i, True)
    return EigenResult(eigenvalue, v, residual, num_iters, converged)


# --------------------------------------------------------------------------------------------
# Lanczos and deflation
# --------------------------------------------------------------------------------------------

WHICH = ("LA", "SA", "LM")


class Tridiagonal(NamedTuple):
    """The Lanczos tridiagonal ``T_m = Q_mᵀ H Q_m``: diagonal ``alphas`` (length m), off-diagonal
    ``betas`` (length m − 1), both float64 on the CPU, and the ``num_matvecs`` (= m) products used.
    """

    alphas: Tensor
    betas: Tensor
    num_matvecs: int


@dataclass
class _LanczosState:
    """The Lanczos process after m products: ``basis[:m]`` holds q_1..q_m (rows), ``alphas`` and
    ``betas`` hold α_1..α_m and β_1..β_m, where β_m = ‖r_m‖ couples q_m to the next (not yet
    formed) vector; ``breakdown`` says β_m ≈ 0, i.e. span(q_1..q_m) is an invariant subspace."""

    basis: Tensor
    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    breakdown: bool = False

    @property
    def size(self) -> int:
        return len(self.alphas)

    def tridiagonal(self) -> Tensor:
        """``T_m`` as a dense float64 matrix."""
        alphas = torch.tensor(self.alphas, dtype=torch.float64)
        betas = torch.tensor(self.betas[:-1], dtype=torch.float64)
        return torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)


def orthogonalize(w: Tensor, basis: Tensor, algebra: VectorAlgebra) -> Tensor:
    """``w − B Bᵀ w`` for a basis with orthonormal rows, applied twice (twice is enough: Kahan,
    Parlett), so the result is orthogonal to the rows to working precision. ``Bᵀ w`` (one
    number per row) is summed over the pieces by ``algebra``: one reduction of ``len(B)``
    numbers for a sharded basis."""
    for _ in range(2):
        w = w - basis.T @ algebra.sum(basis @ w)
    return w


def _checked_matvec(matvec: MatVec, v: Tensor, step: int, algebra: VectorAlgebra) -> Tensor:
    """``matvec(v)`` checked: same shape as ``v``, finite, and no more precise than ``v`` (the
    basis would round a float64 product to float32, capping the Ritz values at ~1e-8 relative
    error whatever the number of steps)."""
    hv = matvec(v.clone())
    if not isinstance(hv, Tensor) or hv.shape != v.shape:
        shape = tuple(hv.shape) if isinstance(hv, Tensor) else type(hv).__name__
        raise ValueError(f"matvec must return a tensor of shape {tuple(v.shape)}, got {shape}")
    if torch.promote_types(hv.dtype, v.dtype) != v.dtype:
        raise TypeError(
            f"matvec returned {hv.dtype} products for {v.dtype} Lanczos vectors, which would "
            f"round them to {v.dtype}; start from a {hv.dtype} v0 (or pass dtype={hv.dtype})"
        )
    if not algebra.all_true(bool(torch.isfinite(hv).all())):
        raise FloatingPointError(f"Hessian-vector product is not finite at iteration {step}")
    return hv.to(v.dtype)


def _lanczos_steps(
    matvec: MatVec,
    q1: Tensor,
    num_iters: int,
    *,
    restart_below: int = 0,
    generator: torch.Generator | None = None,
    algebra: VectorAlgebra,
) -> Iterator[_LanczosState]:
    """The one Lanczos loop of the package, with full reorthogonalization (Paige 1972; Parlett,
    *The Symmetric Eigenvalue Problem*, §13): ``r_j = H q_j − α_j q_j − β_{j−1} q_{j−1}``, then
    ``r_j`` is Gram–Schmidt-orthogonalized twice against all of ``q_1..q_j``, ``β_j = ‖r_j‖`` and
    ``q_{j+1} = r_j / β_j``. Yields the state after every product.

    ``q1`` must be a unit 1-D vector. When ``β_j ≈ 0`` (invariant subspace) the process stops,
    unless fewer than ``restart_below`` vectors were built: then it continues from a random vector
    (``generator``) orthogonal to the basis, with ``β_j`` set to 0 (``T`` becomes block diagonal,
    still ``QᵀHQ``). Breakdown is declared when ``β_j ≤ 10 · eps · ‖T‖`` (row-sum estimate).

    Vectors may be sharded (``algebra``, see :class:`VectorAlgebra`): the basis then holds this
    rank's rows of every ``q_j`` (about ``1/N`` of the whole basis per rank), and each step
    reduces ``α_j``, ``β_j`` and the ``2j`` reorthogonalization coefficients over the ranks.
    """
    dtype = q1.dtype
    eps = torch.finfo(dtype).eps
    # The basis grows by doubling, so a generous num_iters with early stopping costs no memory.
    state = _LanczosState(basis=q1.new_empty(min(num_iters, 8), q1.numel()))
    state.basis[0] = q1
    norm_estimate = 0.0  # max row sum of |T| so far, a lower bound on ‖H‖
    for j in range(num_iters):
        q = state.basis[j]
        w = _checked_matvec(matvec, q, j + 1, algebra)
        alpha = float(algebra.dot(q.double(), w.double()))  # float64 sum: α sets the Ritz values
        w = w - alpha * q
        if j > 0:
            w = w - state.betas[-1] * state.basis[j - 1]
        w = orthogonalize(w, state.basis[: j + 1], algebra)
        beta = float(algebra.norm(w.double()))  # float64: a float32 sum loses ~√dim·eps
        previous_beta = state.betas[-1] if j > 0 else 0.0
        norm_estimate = max(norm_estimate, abs(alpha) + beta + previous_beta)
        state.alphas.append(alpha)
        state.betas.append(beta)
        state.breakdown = beta <= 10 * eps * norm_estimate
        yield state
        if j + 1 == num_iters:
            return
        if state.breakdown:
            if j + 1 >= restart_below:
                return
            w = random_piece(algebra, generator, dtype, q1.device)
            w = orthogonalize(w, state.basis[: j + 1], algebra)
            state.betas[-1] = 0.0
            state.breakdown = False
            beta = float(algebra.norm(w.double()))
        if j + 1 == len(state.basis):
            grown = min(2 * len(state.basis), num_iters)
            state.basis = torch.cat([state.basis, state.basis.new_empty(grown - j - 1, w.numel())])
        state.basis[j + 1] = w / beta


def _check_num_iters_vector(
    v0: Tensor, num_iters: int, algebra: VectorAlgebra
) -> tuple[Tensor, int]:
    """Validate a start vector; return it normalized and ``num_iters`` capped at its (global)
    dimension."""
    check_positive_int("num_iters", num_iters)
    if not isinstance(v0, Tensor):
        raise TypeError(f"v0 must be a torch.Tensor, got {type(v0).__name__}")
    if v0.dim() != 1 or not v0.is_floating_point():
        raise ValueError(
            f"v0 must be a 1-D floating-point tensor, got shape {tuple(v0.shape)} and {v0.dtype}"
        )
    norm = float(algebra.norm(v0.double()))
    if not math.isfinite(norm) or norm == 0:
        raise ValueError(f"v0 must be a finite nonzero vector, got norm {norm}")
    return v0 / norm, min(num_iters, algebra.global_numel)


def _start_vector(
    v0: Tensor | int,
    generator: torch.Generator | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    algebra: VectorAlgebra | None = None,
) -> Tensor:
    """``v0`` (cast to ``dtype``/``device`` when given), or a random unit vector of dimension
    ``v0`` (default float32) drawn from ``generator`` (with a sharded ``algebra``: drawn whole,
    ``v0`` the global dimension, and cut to this rank's piece)."""
    if isinstance(v0, Tensor):
        return v0.to(dtype=dtype or v0.dtype, device=device or v0.device)
    if isinstance(v0, bool) or not isinstance(v0, int):
        raise TypeError(f"v0 must be a torch.Tensor or an int dimension >= 1, got {v0!r}")
    check_positive_int("v0", v0)
    whole = random_unit_vector(v0, generator=generator, dtype=dtype or torch.float32, device=device)
    return whole if algebra is None else algebra.shard(whole)


def lanczos_tridiagonal(
    matvec: MatVec, v0: Tensor, num_iters: int, algebra: VectorAlgebra | None = None
) -> Tridiagonal:
    """Run ``m = min(num_iters, dim)`` Lanczos steps from ``v0`` (normalized) and return the
    tridiagonal ``T_m = Q_mᵀ H Q_m`` (Lanczos 1950, with full reorthogonalization).

    Stops earlier, with ``m`` smaller, if the Krylov space becomes invariant (``β_m ≈ 0``); then the
    eigenvalues of ``T_m`` are exact eigenvalues of ``H``. Used by stochastic Lanczos quadrature.
    ``algebra`` (optional) makes the sums global for sharded vectors (:class:`VectorAlgebra`).
    """
    algebra = algebra_for(v0, algebra)
    q1, num_iters = _check_num_iters_vector(v0, num_iters, algebra)
    state = deque(_lanczos_steps(matvec, q1, num_iters, algebra=algebra), maxlen=1)[0]
    alphas = torch.tensor(state.alphas, dtype=torch.float64)
    betas = torch.tensor(state.betas[:-1], dtype=torch.float64)
    return Tridiagonal(alphas, betas, state.size)


def _wanted(ritz_values: Tensor, k: int, which: str) -> Tensor:
    """Indices of the ``k`` wanted Ritz values, in the order they are returned."""
    if which == "LA":
        key, descending = ritz_values, True
    elif which == "SA":
        key, descending = ritz_values, False
    else:
        key, descending = ritz_values.abs(), True
    return torch.argsort(key, descending=descending, stable=True)[:k]


def lanczos(
    matvec: MatVec,
    v0: Tensor | int,
    num_iters: int,
    k: int = 1,
    which: str = "LA",
    tol: float | None = None,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    algebra: VectorAlgebra | None = None,
) -> list[EigenResult]:
    """``k`` Ritz pairs of ``H`` from ``m ≤ min(num_iters, dim)`` Lanczos steps started at ``v0``.

    The Ritz pairs ``(θ_i, y_i = Q_m s_i)`` come from the eigendecomposition ``T_m s_i = θ_i s_i``
    (float64) of the Lanczos tridiagonal. ``which`` selects them: ``"LA"`` algebraically largest
    (returned in descending order), ``"SA"`` smallest (ascending), ``"LM"`` largest magnitude
    (by ``|θ|`` descending). Unlike power iteration, ``"LA"`` finds the largest eigenvalue even
    when a negative eigenvalue is larger in magnitude.

    ``residual`` is ``|β_m · s_i[m]|`` (``β_m`` the last Lanczos coefficient, ``s_i[m]`` the last
    component of ``s_i``), which equals ``‖H y_i − θ_i y_i‖`` for an orthonormal basis and costs no
    product. ``converged`` means ``residual ≤ tol · |θ_i|``; with ``tol`` set the iteration stops
    as soon as all ``k`` wanted pairs satisfy it. Tolerance rule: a Ritz value with residual
    ``r`` lies within ``r`` of an eigenvalue of ``H``, and within ``r²/δ`` when ``δ`` is the gap
    to the rest of the spectrum (the Kato–Temple inequality; Parlett, *The Symmetric Eigenvalue
    Problem*, ch. 10), so stopping at ``tol`` leaves a relative eigenvalue error of at most
    ``tol² · |θ_i| / δ`` (and at most ``tol``). For float64 precision pass ``tol=None`` (all
    ``num_iters`` products) or ``tol ≈ 1e-8``, with float64 vectors: a product more precise than
    the vectors raises TypeError instead of being rounded. If the Krylov space becomes invariant
    (``β ≈ 0``) the iteration stops and the pairs are exact (``converged=True``); if that happens
    before ``k`` vectors exist, it continues from a random vector drawn from ``generator``
    orthogonal to the basis. ``v0`` may be an int dimension: a random start from ``generator``
    (``dtype`` default float32). ``num_matvecs`` is the number of products used (shared by all
    pairs). Eigenvectors are unit-norm in ``v0``'s dtype.

    ``algebra`` (optional, :class:`VectorAlgebra`) makes every sum global for vectors sharded
    over processes (FSDP2: ``op.layout`` of a sharded operator): ``v0`` and the eigenvectors are
    then this rank's pieces (an int ``v0`` is the global dimension, drawn whole and cut), each
    rank stores its rows of the basis, and every rank gets the same Ritz values.
    """
    v0 = _start_vector(v0, generator, dtype, device, algebra)
    algebra = algebra_for(v0, algebra)
    q1, num_iters = _check_num_iters_vector(v0, num_iters, algebra)
    check_positive_int("k", k)
    if k > num_iters:
        raise ValueError(f"k must be <= min(num_iters, dim) = {num_iters}, got {k}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0 or None, got {tol}")

    def ritz(state: _LanczosState) -> tuple[Tensor, Tensor, Tensor]:
        values, vectors = torch.linalg.eigh(state.tridiagonal())
        index = _wanted(values, k, which)
        residuals = (state.betas[-1] * vectors[-1, index]).abs()
        return values[index], vectors[:, index], residuals

    state = None
    steps = _lanczos_steps(
        matvec, q1, num_iters, restart_below=k, generator=generator, algebra=algebra
    )
    for state in steps:
        if tol is not None and state.size >= k and not state.breakdown:
            values, _, residuals = ritz(state)
            if bool((residuals <= tol * values.abs()).all()):
                break
    assert state is not None
    values, vectors, residuals = ritz(state)
    m = state.size
    ritz_vectors = vectors.T.to(dtype=q1.dtype, device=q1.device) @ state.basis[:m]
    norms = algebra.sum(ritz_vectors.double().square().sum(dim=1, keepdim=True)).sqrt()
    ritz_vectors = ritz_vectors / norms.to(q1.dtype)
    results = []
    for value, vector, res in zip(values.tolist(), ritz_vectors, residuals.tolist(), strict=True):
        converged = state.breakdown or (tol is not None and res <= tol * abs(value))
        results.append(EigenResult(value, vector, res, m, converged))
    return results


def deflated_power_iteration(
    matvec: MatVec,
    v0: Tensor | int,
    k: int,
    num_iters: int,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    algebra: VectorAlgebra | None = None,
) -> list[EigenResult]:
    """The ``k`` eigenpairs of largest magnitude, one after another, by power iteration with
    Hotelling deflation (Hotelling 1933).

    Pair ``i`` is found by :func:`power_iteration` (at most ``num_iters`` products, ``tol`` as
    there) on the deflated operator ``H − Σ_{j<i} λ_j v_j v_jᵀ``, applied as ``P H P`` with
    ``P = I − V Vᵀ`` over the vectors found so far: this re-orthogonalizes every iterate against
    them, equals Hotelling's operator when they are exact eigenvectors, and keeps the iterates
    orthogonal to them when they are only approximate. The first start vector is ``v0`` (or a
    random vector of dimension ``v0``, ``dtype`` default float32); later ones are random, drawn
    from ``generator``.
    Each result's ``num_matvecs`` counts its own products. ``converged`` means the stopping rule
    met ``tol`` on the deflated operator; ``residual`` is ``‖Hu − λu‖`` for the last (projected)
    vector ``u`` multiplied, with ``H`` itself, so it also carries the small errors of the vectors
    found before (their residuals projected on ``u``). ``algebra`` (optional) makes the sums
    global for sharded vectors (:class:`VectorAlgebra`; ``v0`` as an int is then the global
    dimension).
    """
    start = _start_vector(v0, generator, dtype, device, algebra)
    algebra = algebra_for(start, algebra)
    _check_num_iters_vector(start, num_iters, algebra)
    check_positive_int("k", k)
    dim = algebra.global_numel
    if k > dim:
        raise ValueError(f"k must be <= dim = {dim}, got {k}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0 or None, got {tol}")
    found = torch.empty(0, start.numel(), dtype=start.dtype, device=start.device)
    results: list[EigenResult] = []
    for i in range(k):
        if i > 0:
            start = random_piece(algebra, generator, start.dtype, start.device)
        last: dict[str, Tensor] = {}

        def deflated(v: Tensor, basis: Tensor = found, last: dict[str, Tensor] = last) -> Tensor:
            u = orthogonalize(v, basis, algebra)
            hu = matvec(u)
            last["u"], last["hu"] = u, hu
            return orthogonalize(hu, basis, algebra)

        start = orthogonalize(start, found, algebra)
        result = power_iteration(deflated, start, num_iters, tol, algebra)
        vector = orthogonalize(result.eigenvector, found, algebra)
        vector = vector / algebra.norm(vector)
        residual = float(algebra.norm(last["hu"] - result.eigenvalue * last["u"]))
        results.append(
            EigenResult(result.eigenvalue, vector, residual, result.num_matvecs, result.converged)
        )
        found = torch.cat([found, vector[None]])
    return results
