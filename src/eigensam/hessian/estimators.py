"""Rules that keep the estimate ``v̂`` of the top Hessian eigenvector up to date during training.

An :class:`~eigensam.hessian.tracker.EigenTracker` holds ``v̂`` (one unit vector over all
parameters) and asks its rule three things:

- :meth:`Estimator.due`: does the rule spend Hessian-vector products at this optimizer step?
- :meth:`Estimator.refresh`: spend them, on the current batch (:class:`Products`), from ``v̂``;
- :meth:`Estimator.observe`: use the product that SAM's two passes give for free,
  ``y = (g(w + ε) − g(w)) / ‖ε‖`` along ``d = ε/‖ε‖``, which equals ``H·d`` exactly when the loss
  is quadratic (and is a one-sided finite difference of step ``‖ε‖`` otherwise).

Every rule works on flat vectors through a :class:`~eigensam.hessian.eigen.VectorAlgebra` (dot
products and norms), so every rule runs on FSDP2 shards as well. The
rule's own vectors beyond ``v̂`` are :attr:`Estimator.extra_vectors` (the optimizer's memory
budget). The paper's rule is :class:`BurstPower` (Algorithm 2: ``q`` warm power products on the
current batch every ``p`` steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from eigensam.hessian.eigen import (
    EigenResult,
    MatVec,
    VectorAlgebra,
    check_positive_int,
    lanczos,
    power_iteration,
)


@dataclass
class Products:
    """What a refresh may use: ``matvec`` (``v ↦ H v`` on the current batch), the vector
    ``algebra`` and ``random`` (a fresh random unit vector, for cold starts)."""

    matvec: MatVec
    algebra: VectorAlgebra
    random: Callable[[], Tensor]


def _result(v: Tensor, hv: Tensor, algebra: VectorAlgebra, products: int) -> EigenResult:
    """The pair of a unit ``v`` and its product ``hv``: Rayleigh quotient and residual."""
    value = float(algebra.dot(v, hv))
    residual = float(algebra.norm(hv - value * v))
    return EigenResult(value, v, residual, products, False)


def _oriented(hv: Tensor, v: Tensor, algebra: VectorAlgebra) -> Tensor:
    """``hv`` turned to the side of ``v`` (``sign⟨v, hv⟩ · hv``), so that averages of products
    do not cancel when the eigenvalue is negative."""
    return hv if float(algebra.dot(v, hv)) >= 0 else -hv


def check_positive(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real > 0, else raise naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_fraction(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a real in [0, 1), else raise naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number in [0, 1), got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


class Estimator:
    """A rule for ``v̂`` that spends ``iters`` products every ``interval`` optimizer steps (on
    average), as a burst at every multiple of ``interval``. Subclasses change when and how."""

    name: ClassVar[str] = ""
    # Whether observe() uses SAM's free product (the optimizer then keeps g(w) during a step).
    uses_free_products: ClassVar[bool] = False

    def __init__(self, interval: int = 100, iters: int = 5):
        self.interval = check_positive_int("eig_interval", interval)
        self.iters = check_positive_int("eig_iters", iters)

    @property
    def stride(self) -> int:
        """Steps between two refreshes."""
        return self.interval

    @property
    def extra_vectors(self) -> int:
        """Parameter-sized vectors the rule keeps beyond ``v̂``."""
        return 0

    def due(self, step: int) -> bool:
        """Whether products are spent at optimizer step ``step`` (0-based)."""
        return step % self.stride == 0

    def refresh(self, v: Tensor, first: bool, products: Products) -> EigenResult:
        """A new estimate from ``v`` (unit; random when ``first``, there being no estimate)."""
        raise NotImplementedError

    def observe(
        self, v: Tensor | None, direction: Tensor, product: Tensor, algebra: VectorAlgebra
    ) -> Tensor | None:
        """A new ``v̂`` from the free product ``product ≈ H·direction`` (unit ``direction``), or
        None to keep ``v̂`` (rules that do not use free products)."""
        return None

    def settings(self) -> tuple[Any, ...]:
        """What every replica must agree on (the products they run together)."""
        return (self.interval, self.iters, self.name)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class BurstPower(Estimator):
    """The paper's rule (Algorithm 2): every ``interval`` steps, ``iters`` power-iteration
    products (Algorithm 1) on the current batch, warm-started from ``v̂``. Finds the eigenvalue
    of largest magnitude."""

    name = "power"

    def refresh(self, v: Tensor, first: bool, products: Products) -> EigenResult:
        return power_iteration(products.matvec, v, self.iters, algebra=products.algebra)


class BurstLanczos(Estimator):
    """Every ``interval`` steps, ``iters`` Lanczos products on the current batch, from ``v̂``
    (``warm=True``) or from a fresh random vector (``warm=False``); the top Ritz pair
    (algebraically largest)."""

    def __init__(self, interval: int = 100, iters: int = 5, *, warm: bool = True):
        super().__init__(interval, iters)
        if not isinstance(warm, bool):
            raise TypeError(f"warm must be a bool, got {warm!r}")
        self.warm = warm

    @property
    def name(self) -> str:  # type: ignore[override]
        return "lanczos" if self.warm else "lanczos-cold"

    def refresh(self, v: Tensor, first: bool, products: Products) -> EigenResult:
        start = v if self.warm else products.random()
        algebra = products.algebra
        return lanczos(products.matvec, start, self.iters, k=1, which="LA", algebra=algebra)[0]


class SpreadPower(Estimator):
    """``iters`` products per ``interval`` steps spread out: after a first full burst (a cold
    start has nothing to warm-start from), one warm power step every
    ``stride = max(1, interval // iters)`` steps, each on the batch of its own step."""

    name = "spread"

    @property
    def stride(self) -> int:
        return max(1, self.interval // self.iters)

    def refresh(self, v: Tensor, first: bool, products: Products) -> EigenResult:
        iters = self.iters if first else 1
        return power_iteration(products.matvec, v, iters, algebra=products.algebra)


class AveragedPower(SpreadPower):
    """Stochastic power iteration with momentum: products spread as :class:`SpreadPower`, each
    ``h = H_B v̂`` on its own batch ``B``, averaged across batches,
    ``m ← β·m + (1 − β)·sign⟨v̂, h⟩·h`` and ``v̂ ← m/‖m‖`` (``β = momentum``). The average of
    the batches' products estimates the product of the training loss's Hessian, whose top
    eigenvector is the target. The first refresh is a full warm burst, which starts ``m``.
    Keeps ``m``: one vector beyond ``v̂``."""

    name = "averaged"

    def __init__(self, interval: int = 100, iters: int = 5, *, momentum: float = 0.7):
        super().__init__(interval, iters)
        self.momentum = check_fraction("momentum", momentum)
        self.average: Tensor | None = None

    @property
    def extra_vectors(self) -> int:
        return 1

    def refresh(self, v: Tensor, first: bool, products: Products) -> EigenResult:
        algebra = products.algebra
        average = None if first else self.average
        start = average is None
        if start and self.iters > 1:
            v = power_iteration(products.matvec, v, self.iters - 1, algebra=algebra).eigenvector
        hv = products.matvec(v)
        result = _result(v, hv, algebra, self.iters if start else 1)
        hv = _oriented(hv, v, algebra)
        if average is None:
            average = hv
        else:
            average = average.mul_(self.momentum).add_(hv, alpha=1 - self.momentum)
        self.average = average
        result.eigenvector = average / algebra.norm(average)
        return result

    def settings(self) -> tuple[Any, ...]:
        return (*super().settings(), self.momentum)

    def state_dict(self) -> dict[str, Any]:
        return {"average": None if self.average is None else self.average.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        average = state.get("average")
        self.average = None if average is None else average.clone()


class BlockPower(Estimator):
    """Subspace iteration on a block of ``block`` vectors (``v̂`` first) with Rayleigh–Ritz:
    every ``stride = max(1, interval·block // iters)`` steps (so ``iters`` products per
    ``interval`` steps on average), ``W = H V`` on the current batch, the Ritz pairs of
    ``T = sym(VᵀW)`` order the block (largest first), and the next block is ``W S``
    orthonormalized, ``v̂`` its first vector. A gap between ``λ₁`` and ``λ₂`` that power
    iteration needs is replaced by the gap to ``λ_{block+1}``. Keeps ``block − 1`` vectors
    beyond ``v̂``."""

    name = "block"

    def __init__(self, interval: int = 100, iters: int = 5, *, block: int = 2):
        super().__init__(interval, iters)
        if isinstance(block, bool) or not isinstance(block, int):
            raise TypeError(f"eig_block must be an int in [1, 4], got {block!r}")
        if not 1 <= block <= 4:
            raise ValueError(
                f"eig_block must be in [1, 4] (at most 4 vectors of state), got {block}"
            )
        self.block = block
        self.others: list[Tensor] = []

    @property
    def stride(self) -> int:
        return max(1, self.interval * self.block // self.iters)

    @property
    def extra_vectors(self) -> int:
        return self.block - 1

    def refresh(self, v: Tensor, first: bool, products: Products) -> EigenResult:
        algebra = products.algebra
        others = self.others if len(self.others) == self.block - 1 and not first else []
        while len(others) < self.block - 1:
            others.append(products.random())
        basis = _orthonormal([v, *others], algebra)
        images = [products.matvec(b) for b in basis]
        k = len(basis)
        t = torch.tensor(
            [[float(algebra.dot(basis[i], images[j])) for j in range(k)] for i in range(k)],
            dtype=torch.float64,
        )
        values, vectors = torch.linalg.eigh((t + t.T) / 2)
        order = torch.argsort(values, descending=True)
        values, vectors = values[order], vectors[:, order]
        mix = vectors.to(v.dtype).tolist()
        ritz = sum(c[0] * b for c, b in zip(mix, basis, strict=True))
        hritz = [sum(c[j] * h for c, h in zip(mix, images, strict=True)) for j in range(k)]
        residual = float(algebra.norm(hritz[0] - float(values[0]) * ritz))
        new = _orthonormal(hritz, algebra)
        self.others = new[1:]
        return EigenResult(float(values[0]), new[0], residual, k, False)

    def settings(self) -> tuple[Any, ...]:
        return (*super().settings(), self.block)

    def state_dict(self) -> dict[str, Any]:
        return {"others": [o.clone() for o in self.others]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.others = [o.clone() for o in state.get("others", [])]


def _orthonormal(vectors: list[Tensor], algebra: VectorAlgebra) -> list[Tensor]:
    """Gram–Schmidt (twice, for rounding) of ``vectors`` in order, with ``algebra``'s dot."""
    out: list[Tensor] = []
    for x in vectors:
        for _ in range(2):
            for q in out:
                x = x - float(algebra.dot(q, x)) * q
        out.append(x / algebra.norm(x))
    return out


class Secant(Estimator):
    """``v̂`` moved by SAM's free products: each step gives ``y ≈ H d`` along ``d = ε̂``; with
    ``m ≈ H v̂`` kept, the Rayleigh–Ritz step on ``span{v̂, d}`` solves the 2×2 problem
    ``A x = θ G x`` with ``A = sym([v̂, d]ᵀ[m, y])``, ``G = [v̂, d]ᵀ[v̂, d]``, and takes the top
    ``θ``: ``v̂ ← (x₁v̂ + x₂d)/‖·‖``, ``m ← (x₁m + x₂y)/‖·‖`` (exact products stay exact on a
    fixed quadratic, and ``v̂ᵀHv̂`` never decreases there). ``m`` was computed at earlier weights
    and batches; ``forget`` (in [0, 1)) discounts it, ``A₁₁ ← (1 − forget)·v̂ᵀm``, so that the
    newer direction wins ties. The first observation starts ``v̂ = d``, ``m = y``.

    With ``interval`` set, a refresh every ``interval`` steps spends ``iters`` warm power
    products on the current batch and sets ``m`` to the exact product of ``v̂`` (the last
    vector multiplied); without it (``interval=None``) the rule spends no product at all.
    Keeps ``m``: one vector beyond ``v̂`` (the optimizer keeps ``g(w)`` during a step too)."""

    name = "secant"
    uses_free_products = True

    def __init__(self, interval: int | None = 100, iters: int = 5, *, forget: float = 0.0):
        super().__init__(1 if interval is None else interval, iters)
        self.refreshes = interval is not None
        self.forget = check_fraction("forget", forget)
        self.product: Tensor | None = None

    @property
    def extra_vectors(self) -> int:
        return 1

    def due(self, step: int) -> bool:
        return self.refreshes and super().due(step)

    def refresh(self, v: Tensor, first: bool, products: Products) -> EigenResult:
        algebra = products.algebra
        if self.iters > 1:
            v = power_iteration(products.matvec, v, self.iters - 1, algebra=algebra).eigenvector
        hv = products.matvec(v)
        self.product = hv
        return _result(v, hv, algebra, self.iters)

    def observe(
        self, v: Tensor | None, direction: Tensor, product: Tensor, algebra: VectorAlgebra
    ) -> Tensor | None:
        if v is None or self.product is None:
            self.product = product.clone()
            return direction.clone()
        m = self.product
        c = float(algebra.dot(v, direction))
        if abs(c) > 1 - 1e-6:  # d ∥ v̂: nothing new to mix in
            return None
        a11 = (1 - self.forget) * float(algebra.dot(v, m))
        a12 = 0.5 * (float(algebra.dot(v, product)) + float(algebra.dot(direction, m)))
        a22 = float(algebra.dot(direction, product))
        a = torch.tensor([[a11, a12], [a12, a22]], dtype=torch.float64)
        g = torch.tensor([[1.0, c], [c, 1.0]], dtype=torch.float64)
        # A x = θ G x through G^{-1/2}: symmetric, so eigh orders the θ.
        gvals, gvecs = torch.linalg.eigh(g)
        root = gvecs @ torch.diag(gvals.rsqrt()) @ gvecs.T
        _, vecs = torch.linalg.eigh(root @ a @ root)
        x = root @ vecs[:, -1]
        norm = math.sqrt(float(x @ g @ x))
        x1, x2 = float(x[0]) / norm, float(x[1]) / norm
        self.product = m.mul_(x1).add_(product, alpha=x2)
        return v * x1 + direction * x2

    def settings(self) -> tuple[Any, ...]:
        return (*super().settings(), self.refreshes, self.forget)

    def state_dict(self) -> dict[str, Any]:
        return {"product": None if self.product is None else self.product.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        product = state.get("product")
        self.product = None if product is None else product.clone()


class AdaptiveRefresh(SpreadPower):
    """Products spent where the estimate drifted: every ``stride = max(1, interval // iters)``
    steps one warm power product on the current batch; when the relative residual
    ``‖Hv̂ − λv̂‖/|λ|`` exceeds ``threshold``, more power steps follow, up to ``iters``, until
    it does not (power iteration stopped on the residual). ``threshold`` must be > 0."""

    name = "adaptive"

    def __init__(self, interval: int = 100, iters: int = 5, *, threshold: float = 0.5):
        super().__init__(interval, iters)
        self.threshold = check_positive("eig_threshold", threshold)

    def refresh(self, v: Tensor, first: bool, products: Products) -> EigenResult:
        return power_iteration(
            products.matvec, v, self.iters, tol=self.threshold, algebra=products.algebra
        )

    def settings(self) -> tuple[Any, ...]:
        return (*super().settings(), self.threshold)


ESTIMATORS = (
    "power",
    "paper",
    "lanczos",
    "lanczos-cold",
    "spread",
    "averaged",
    "block",
    "secant",
    "secant-only",
    "adaptive",
)


# The rule Eigen-SAM and X-SAM use unless told otherwise, chosen by the tracking study
# (``eigensam reproduce tracking``): warm power iteration at its own budget below, which
# follows v₁ better than the paper's budget at fewer products. "paper" is the paper's rule
# at the paper's budget (Algorithm 2, 5 products every 100 steps).
DEFAULT_ESTIMATOR = "power"
PAPER_ESTIMATOR = "paper"
# A rule's budget (interval p, products q per p) when eig_interval / eig_iters are not given:
# the default rule's as measured best in the study, every other rule the paper's.
PAPER_BUDGET = (100, 5)
BUDGETS = {DEFAULT_ESTIMATOR: (40, 2)}


def default_budget(name: str) -> tuple[int, int]:
    """``(interval, iters)`` of the rule ``name`` (one of :data:`ESTIMATORS`) when they are not
    given."""
    if name not in ESTIMATORS:
        raise ValueError(f"eig_estimator must be one of {ESTIMATORS}, got {name!r}")
    return BUDGETS.get(name, PAPER_BUDGET)


def make_estimator(
    name: str, interval: int | None = None, iters: int | None = None, **options: Any
) -> Estimator:
    """The rule called ``name`` (one of :data:`ESTIMATORS`) spending ``iters`` products every
    ``interval`` steps (None: :func:`default_budget`), with its own ``options`` (``momentum``,
    ``block``, ``forget``, ``threshold``)."""
    rules: dict[str, Callable[..., Estimator]] = {
        "power": BurstPower,
        "paper": BurstPower,
        "lanczos": BurstLanczos,
        "lanczos-cold": lambda i, q: BurstLanczos(i, q, warm=False),
        "spread": SpreadPower,
        "averaged": AveragedPower,
        "block": BlockPower,
        "secant": Secant,
        "secant-only": lambda i, q, **o: Secant(None, q, **o),
        "adaptive": AdaptiveRefresh,
    }
    default_interval, default_iters = default_budget(name)
    interval = default_interval if interval is None else interval
    iters = default_iters if iters is None else iters
    try:
        return rules[name](interval, iters, **options)
    except TypeError as error:
        if "unexpected keyword" not in str(error):
            raise
        raise TypeError(f"eig_estimator={name!r} takes no option among {sorted(options)}") from None
