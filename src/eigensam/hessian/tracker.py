"""The top-eigenvector estimate that Eigen-SAM and X-SAM refresh every few steps."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from eigensam.hessian.closures import AUTO, Closure
from eigensam.hessian.eigen import EigenResult, check_positive_int, lanczos, power_iteration
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


class EigenTracker:
    """Warm-started estimate ``v̂`` of the top Hessian eigenvector (paper Algorithm 2, line 3-4).

    Every ``interval`` optimizer steps, ``update`` runs ``iters`` Hessian-vector products on the
    current mini-batch, starting from the previous ``v̂`` (a random unit vector the first time,
    drawn from a private generator seeded with ``seed``, so the global RNG is not touched):

    - ``method="power"``: power iteration (paper Algorithm 1); finds the eigenvalue of largest
      magnitude, which can be negative early in training; ``eigenvalue`` keeps the sign.
    - ``method="lanczos"``: Lanczos with the same number of products; finds the algebraically
      largest eigenvalue.

    ``schedule="burst"`` (the paper) spends the ``iters`` products at once every ``interval``
    steps. ``schedule="spread"`` spends the same number of products per interval one at a time:
    after a first full refresh (a cold start has no estimate to warm-start from), one
    warm-started power step every ``stride = max(1, interval // iters)`` steps, each on the batch
    of its own step, so the estimate follows the moving Hessian (power method only).

    ``backend`` is the Hessian-vector-product backend; ``"auto"`` (default) is decided at the
    first update by :func:`choose_backend` (exact double backward, or finite differences with a
    warning when the model has none) and then kept, in ``state_dict`` too. ``mode`` ("eval" by
    default, as the official Eigen-SAM code) is the model's mode during the products.

    ``eigenvalue`` and ``residual`` (‖Hv − λv‖) describe the latest estimate. ``vector`` spans
    all ``params``; parameters with ``requires_grad=False`` are constants of the loss, and ``v̂``
    is 0 on them. ``evaluation`` is the operator's :class:`~eigensam.hessian.hvp.Evaluation` of
    the latest update (the loss and gradient at ``w`` it computed, or None), for an optimizer
    that reuses it as its first pass. ``update`` accepts a
    :class:`~eigensam.hessian.hvp.SplitClosure` (memory-lean exact products).
    ``reduce`` is passed to the :class:`HessianOperator` (under ``torch.distributed``,
    :class:`~eigensam.parallel.MeanAcrossRanks`: the products, hence ``v̂``, are those
    of the global batch loss and identical on every rank).
    """

    def __init__(
        self,
        interval: int = 100,
        iters: int = 5,
        *,
        method: str = "power",
        backend: str = AUTO,
        mode: str | None = "eval",
        seed: int = 0,
        reduce: Callable[[Tensor], Tensor] | None = None,
        schedule: str = "burst",
    ):
        self.reduce = reduce
        self.interval = check_positive_int("eig_interval", interval)
        self.iters = check_positive_int("eig_iters", iters)
        if method not in METHODS:
            raise ValueError(f"eig_method must be one of {METHODS}, got {method!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"eig_schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "spread" and method != "power":
            raise ValueError(
                f"eig_schedule='spread' needs eig_method='power' (a Lanczos basis cannot span "
                f"several Hessians), got eig_method={method!r}"
            )
        self.method = method
        self.schedule = schedule
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
    def stride(self) -> int:
        """Steps between refreshes: ``interval`` (burst) or ``max(1, interval // iters)``."""
        return self.interval if self.schedule == "burst" else max(1, self.interval // self.iters)

    def due(self, step: int) -> bool:
        """Whether the estimate is refreshed at optimizer step ``step`` (0-based)."""
        return step % self.stride == 0

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
        rank's rows; the solvers' dot products and norms are global (Lanczos keeps its basis
        sharded too)."""
        layout = ParamLayout(params)
        # Parameters of several dtypes: flat vectors take the promoted one, as torch.cat does.
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in params])
        if self.vector is None or self.vector.numel() != layout.numel:
            v0 = torch.randn(layout.global_numel, generator=self.generator, dtype=torch.float32)
            v0 = layout.shard(v0.to(device=params[0].device, dtype=dtype))
        else:
            v0 = self.vector
        v0 = v0.to(device=params[0].device, dtype=dtype)
        # The operator acts on the parameters that require gradients only.
        trainable = [p for p in params if p.requires_grad]
        trainable_layout = ParamLayout(trainable) if len(trainable) < len(params) else layout
        if len(trainable) < len(params):
            chunks = layout.unflatten(v0)
            v0 = trainable_layout.flatten(
                [c for c, p in zip(chunks, params, strict=True) if p.requires_grad]
            )
        self.evaluation = None
        result, self.backend = run_with_backend(
            self.backend, params, lambda backend: self._solve(closure, params, model, v0, backend)
        )
        found = iter(trainable_layout.unflatten(result.eigenvector.detach()))
        self.vector = layout.flatten([next(found) if p.requires_grad else None for p in params])
        self.eigenvalue = result.eigenvalue / loss_scale
        self.residual = result.residual / loss_scale
        self.num_updates += 1
        return result

    def _solve(
        self,
        closure: Closure,
        params: Sequence[Tensor],
        model: nn.Module | None,
        v0: Tensor,
        backend: str,
    ) -> EigenResult:
        """Power iteration or Lanczos from ``v0`` on the operator of ``backend``; keeps the
        operator's evaluation at ``w`` in ``evaluation``."""
        mode = self.mode if model is not None else None
        operator = HessianOperator(
            closure, params, backend=backend, model=model, mode=mode, reduce=self.reduce
        )
        with operator as op:
            if self.method == "power":
                spread = self.schedule == "spread" and self.vector is not None
                iters = 1 if spread else self.iters
                result = power_iteration(op.matvec, v0, iters, algebra=op.layout)
            else:
                result = lanczos(op.matvec, v0, self.iters, k=1, which="LA", algebra=op.layout)[0]
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
