"""The top-eigenvector estimate that Eigen-SAM and X-SAM refresh every few steps."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from eigensam.hessian.closures import AUTO, Closure
from eigensam.hessian.eigen import EigenResult, check_positive_int
from eigensam.hessian.estimators import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    PAPER_ESTIMATOR,
    Estimator,
    Products,
    make_estimator,
)
from eigensam.hessian.hvp import (
    BACKENDS,
    EXACT_UNDER_FSDP2,
    FD_FALLBACK,
    FD_SCALE,
    DoubleBackwardError,
    Evaluation,
    HessianOperator,
    check_mode,
)
from eigensam.parallel import ParamLayout

METHODS = ("power", "lanczos")
SCHEDULES = ("burst", "spread")
TRACKER_BACKENDS = (AUTO, *BACKENDS)
T = TypeVar("T")


def check_tracker_backend(backend: str) -> str:
    """Return ``backend`` if it is ``"auto"`` or an HVP backend, else raise listing them."""
    if backend not in TRACKER_BACKENDS:
        raise ValueError(f"hvp must be one of {TRACKER_BACKENDS}, got {backend!r}")
    return backend


def choose_backend(
    requested: str, params: Sequence[Tensor], error: DoubleBackwardError | None = None
) -> str:
    """The backend to use for ``params``: ``requested`` unless it is ``"auto"``, which is
    ``"autograd"`` (exact) until the exact product failed with ``error`` (the model has no
    double backward), then :data:`~eigensam.hessian.hvp.FD_FALLBACK`.

    FSDP2 (``params`` sharded ``DTensor`` parameters): ``"auto"`` is ``FD_FALLBACK`` without trying
    the exact product, and ``"autograd"`` raises ``ValueError`` naming the finite-difference
    backends (double backward does not reach sharded parameters)."""
    if ParamLayout(params).sharded:
        if requested == "autograd":
            raise ValueError(EXACT_UNDER_FSDP2)
        return FD_FALLBACK if requested == AUTO else requested
    if requested != AUTO:
        return requested
    return FD_FALLBACK if error is not None else "autograd"


def run_with_backend(
    requested: str, params: Sequence[Tensor], run: Callable[[str], T]
) -> tuple[T, str]:
    """``run(backend)`` with the backend :func:`choose_backend` picks; for ``"auto"``, when the
    exact product raises :class:`~eigensam.hessian.hvp.DoubleBackwardError`, warn once (naming
    torch's reason) and run again with the finite-difference fallback. Returns the result and
    the backend used."""
    backend = choose_backend(requested, params)
    if requested != AUTO:
        return run(backend), backend
    try:
        return run(backend), backend
    except DoubleBackwardError as error:
        backend = choose_backend(AUTO, params, error)
        warnings.warn(
            f"hvp='auto': this model has no double backward ({error.reason}); its "
            f"Hessian-vector products use finite differences ('{backend}', "
            f"fd_scale={FD_SCALE[backend]:g}) from now on",
            RuntimeWarning,
            stacklevel=4,
        )
        return run(backend), backend


def rule_name(estimator: str | Estimator | None, method: str | None, schedule: str | None) -> str:
    """The name of the rule that ``eig_estimator``, or ``eig_method`` and ``eig_schedule`` (the
    paper's family, :data:`METHODS` x :data:`SCHEDULES`, at the paper's budget: ``"power"`` and
    ``"burst"`` are ``"paper"``), describe; with none of them,
    :data:`~eigensam.hessian.estimators.DEFAULT_ESTIMATOR`."""
    if method is not None and method not in METHODS:
        raise ValueError(f"eig_method must be one of {METHODS}, got {method!r}")
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"eig_schedule must be one of {SCHEDULES}, got {schedule!r}")
    family = (method or "power", schedule or "burst")
    if estimator is not None:
        if not isinstance(estimator, str | Estimator):
            raise TypeError(
                f"eig_estimator must be a name in {ESTIMATORS} or an Estimator, got {estimator!r}"
            )
        if family != ("power", "burst"):
            raise ValueError(
                f"eig_estimator={estimator!r} names the rule; eig_method={method!r} and "
                f"eig_schedule={schedule!r} describe the paper's family and must be None (or "
                "'power' and 'burst') with it"
            )
        return estimator if isinstance(estimator, str) else estimator.name
    if method is None and schedule is None:
        return DEFAULT_ESTIMATOR
    if family[0] == "lanczos":
        if family[1] == "spread":
            raise ValueError(
                "eig_schedule='spread' needs eig_method='power' (a Lanczos basis cannot span "
                "several Hessians), got eig_method='lanczos'"
            )
        return "lanczos"
    return "spread" if family[1] == "spread" else PAPER_ESTIMATOR


class EigenTracker:
    """Warm-started estimate ``v̂`` of the top Hessian eigenvector (paper Algorithm 2, line 3-4),
    kept up to date by a rule from :mod:`eigensam.hessian.estimators`.

    The rule is ``estimator``: an :class:`~eigensam.hessian.estimators.Estimator`, or the name
    of one (:data:`~eigensam.hessian.estimators.ESTIMATORS`) spending ``iters`` products every
    ``interval`` steps (None: the rule's :func:`~eigensam.hessian.estimators.default_budget`).
    ``method`` and ``schedule`` name the paper's family at the paper's budget (give them or
    ``estimator``, not both kinds):

    - ``method="power"``, ``schedule="burst"``: ``"paper"``, every ``interval`` optimizer steps
      ``iters`` power-iteration products (paper Algorithm 1) on the current mini-batch,
      starting from the previous ``v̂``; finds the eigenvalue of largest magnitude, which can be
      negative early in training (``eigenvalue`` keeps the sign);
    - ``method="lanczos"``: ``"lanczos"``, warm Lanczos (algebraically largest);
    - ``schedule="spread"``: ``"spread"``, one warm power step every
      ``stride = max(1, interval // iters)`` steps after a first full refresh, each on the
      batch of its own step (power method only).

    With none of them, the rule is :data:`~eigensam.hessian.estimators.DEFAULT_ESTIMATOR`: the
    paper's warm power iteration at 2 products every 40 steps.

    The first start vector is a random unit vector drawn from a private generator seeded with
    ``seed`` (the global RNG is not touched). ``backend`` is the Hessian-vector-product backend;
    ``"auto"`` (default) is decided at the first update by :func:`choose_backend` (exact double
    backward, or finite differences with a warning when the model has none) and then kept, in
    ``state_dict`` too. ``mode`` ("eval" by default, as the official Eigen-SAM code) is the
    model's mode during the products.

    ``eigenvalue`` and ``residual`` (‖Hv − λv‖) describe the latest refresh. ``vector`` spans
    all ``params``; parameters with ``requires_grad=False`` are constants of the loss, and ``v̂``
    is 0 on them. ``evaluation`` is the operator's :class:`~eigensam.hessian.hvp.Evaluation` of
    the latest update (the loss and gradient at ``w`` it computed, or None), for an optimizer
    that reuses it as its first pass. ``update`` accepts a
    :class:`~eigensam.hessian.hvp.SplitClosure` (memory-lean exact products).
    ``reduce`` is passed to the :class:`HessianOperator` (under ``torch.distributed``,
    :class:`~eigensam.parallel.MeanAcrossRanks`: the products, hence ``v̂``, are those
    of the global batch loss and identical on every rank). :meth:`observe` hands a rule that
    uses them (``estimator.uses_free_products``) the product of SAM's two passes.
    """

    def __init__(
        self,
        interval: int | None = None,
        iters: int | None = None,
        *,
        method: str | None = None,
        backend: str = AUTO,
        mode: str | None = "eval",
        seed: int = 0,
        reduce: Callable[[Tensor], Tensor] | None = None,
        schedule: str | None = None,
        estimator: str | Estimator | None = None,
    ):
        self.reduce = reduce
        name = rule_name(estimator, method, schedule)
        self.rule = (
            estimator if isinstance(estimator, Estimator) else make_estimator(name, interval, iters)
        )
        self.requested_backend = check_tracker_backend(backend)
        # "auto" until the first update decides (see choose_backend), then the concrete one.
        self.backend = self.requested_backend
        self.mode = check_mode(mode)
        self.generator = torch.Generator().manual_seed(seed)
        self.vector: Tensor | None = None
        self.eigenvalue: float | None = None
        self.residual: float | None = None
        self.evaluation: Evaluation | None = None
        self.num_updates = 0

    @property
    def interval(self) -> int:
        """The rule's ``interval``: steps over which it spends ``iters`` products."""
        return self.rule.interval

    @interval.setter
    def interval(self, value: int) -> None:
        self.rule.interval = check_positive_int("eig_interval", value)

    @property
    def iters(self) -> int:
        return self.rule.iters

    @property
    def stride(self) -> int:
        """Steps between refreshes (``interval`` for the paper's burst)."""
        return self.rule.stride

    def due(self, step: int) -> bool:
        """Whether the estimate is refreshed at optimizer step ``step`` (0-based)."""
        return self.rule.due(step)

    def settings(self) -> tuple[Any, ...]:
        """What replicas must agree on: the rule's settings, backend and mode."""
        return (*self.rule.settings(), self.backend, self.mode)

    def update(
        self,
        closure: Closure,
        params: Sequence[Tensor],
        model: nn.Module | None = None,
        loss_scale: float = 1.0,
    ) -> EigenResult:
        """Refresh ``v̂`` on the closure's loss; ``loss_scale`` divides out a GradScaler scale.

        Under FSDP2 (``params`` sharded ``DTensor`` parameters) ``v̂`` is this rank's part
        (:class:`~eigensam.parallel.ParamLayout`): the first start vector is drawn
        whole (the one process's draw, a transient full-size float32 vector) and cut to this
        rank's rows; the rules' dot products and norms are global (Lanczos keeps its basis
        sharded too)."""
        layout = ParamLayout(params)
        first = self.vector is None or self.vector.numel() != layout.numel
        v0 = self._random(params, layout) if first else self.vector
        assert v0 is not None
        restriction = Restriction(params, layout)
        v0 = restriction.gather(v0.to(device=params[0].device, dtype=restriction.dtype))
        self.evaluation = None
        result, self.backend = run_with_backend(
            self.backend,
            params,
            lambda backend: self._solve(closure, params, model, v0, first, backend),
        )
        self.vector = restriction.scatter(result.eigenvector.detach())
        self.eigenvalue = result.eigenvalue / loss_scale
        self.residual = result.residual / loss_scale
        self.num_updates += 1
        return result

    def observe(self, params: Sequence[Tensor], direction: Tensor, product: Tensor) -> None:
        """Give the rule SAM's free product: ``product ≈ H·direction`` (flat vectors over
        ``params``, ``direction`` a unit vector; exact on a quadratic). A rule that does not use
        free products ignores it."""
        if not self.rule.uses_free_products:
            return
        restriction = Restriction(params, ParamLayout(params))
        v = None if self.vector is None else restriction.gather(self.vector)
        new = self.rule.observe(
            v,
            restriction.gather(direction),
            restriction.gather(product),
            restriction.trainable_layout,
        )
        if new is not None:
            new = new / restriction.trainable_layout.norm(new)
            self.vector = restriction.scatter(new.detach())

    def _random(self, params: Sequence[Tensor], layout: ParamLayout) -> Tensor:
        """A random start over all ``params`` from the private generator (this rank's rows)."""
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in params])
        v0 = torch.randn(layout.global_numel, generator=self.generator, dtype=torch.float32)
        return layout.shard(v0.to(device=params[0].device, dtype=dtype))

    def _solve(
        self,
        closure: Closure,
        params: Sequence[Tensor],
        model: nn.Module | None,
        v0: Tensor,
        first: bool,
        backend: str,
    ) -> EigenResult:
        """The rule's refresh from ``v0`` on the operator of ``backend``; keeps the operator's
        evaluation at ``w`` in ``evaluation``."""
        mode = self.mode if model is not None else None
        operator = HessianOperator(
            closure, params, backend=backend, model=model, mode=mode, reduce=self.reduce
        )
        layout = ParamLayout(params)

        def random() -> Tensor:
            return Restriction(params, layout).gather(self._random(params, layout))

        with operator as op:
            products = Products(op.matvec, op.layout, random)
            start = v0 / op.layout.norm(v0) if first else v0
            result = self.rule.refresh(start, first, products)
        self.evaluation = op.evaluation
        return result

    def state_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "vector": None if self.vector is None else self.vector.clone(),
            "eigenvalue": self.eigenvalue,
            "residual": self.residual,
            "num_updates": self.num_updates,
            "generator": self.generator.get_state(),
            "estimator": self.rule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vector = state["vector"]
        self.vector = None if vector is None else vector.clone()
        self.eigenvalue = state["eigenvalue"]
        self.residual = state["residual"]
        self.num_updates = state["num_updates"]
        if self.requested_backend == AUTO:  # a resumed run keeps the backend "auto" chose
            self.backend = state.get("backend", AUTO)
        self.generator.set_state(state["generator"])
        self.rule.load_state_dict(state.get("estimator", {}))


class Restriction:
    """Flat vectors over all ``params`` and over those that require gradients (the variables
    of the Hessian): ``gather`` keeps the trainable rows, ``scatter`` puts them back with 0 on
    the frozen ones; identity when every parameter is trainable. ``dtype`` is the promoted
    dtype of the parameters (as ``torch.cat`` would give)."""

    def __init__(self, params: Sequence[Tensor], layout: ParamLayout):
        self.params = list(params)
        self.layout = layout
        self.dtype = functools.reduce(torch.promote_types, [p.dtype for p in params])
        trainable = [p for p in params if p.requires_grad]
        self.partial = len(trainable) < len(self.params)
        self.trainable_layout = ParamLayout(trainable) if self.partial else layout

    def gather(self, vector: Tensor) -> Tensor:
        if not self.partial:
            return vector
        chunks = self.layout.unflatten(vector)
        return self.trainable_layout.flatten(
            [c for c, p in zip(chunks, self.params, strict=True) if p.requires_grad]
        )

    def scatter(self, vector: Tensor) -> Tensor:
        if not self.partial:
            return vector
        found = iter(self.trainable_layout.unflatten(vector))
        return self.layout.flatten([next(found) if p.requires_grad else None for p in self.params])
