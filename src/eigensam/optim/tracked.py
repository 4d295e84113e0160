"""The two-pass core plus an eigenvector tracker: :class:`TrackedSAM`, the base of Eigen-SAM and
X-SAM, refreshes the estimate ``v̂`` of the top Hessian eigenvector before the first pass."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from eigensam.hessian.closures import AUTO
from eigensam.hessian.estimators import Estimator
from eigensam.hessian.hvp import Evaluation
from eigensam.hessian.tracker import EigenTracker
from eigensam.optim.fsdp2 import check_fsdp2_options
from eigensam.optim.sam import SAM, check_nonnegative
from eigensam.parallel import local_forward

HESSIAN_PARTS_REMEDY = "hessian_mode='eval' or hessian_parts=1"
FREE_PRODUCTS_LOCAL = (
    "eig_estimator={!r} uses the product of SAM's two passes, which with sharpness='local' mix "
    "this replica's gradient with the global one (and differ per replica); use "
    "sharpness='global' or a rule that spends its own products"
)


class TrackedSAM(SAM):
    """SAM plus an :class:`EigenTracker` whose rule refreshes ``v̂`` on the current batch, before
    the first pass (so the estimate and the step see the same dropout masks).

    ``hvp`` picks the Hessian-vector-product backend: ``"auto"`` (default: exact double
    backward when the model supports it, else finite differences, decided once at the first
    refresh with a warning, kept in ``state_dict``; the choice is ``tracker.backend``),
    ``"autograd"``, ``"fd-central"`` or ``"fd-forward"`` (see :mod:`eigensam.hessian.hvp`).
    ``eig_estimator`` names the rule that keeps ``v̂`` up to date (a name from
    :data:`~eigensam.hessian.estimators.ESTIMATORS` or an
    :class:`~eigensam.hessian.estimators.Estimator`), spending ``eig_iters`` products every
    ``eig_interval`` steps on average (None: the rule's own budget,
    :func:`~eigensam.hessian.estimators.default_budget`). The default is the paper's rule, warm
    power iteration on the current batch, at a shorter cycle: 2 products every 40 steps
    (``"power"``, chosen by ``eigensam reproduce tracking``: it follows the training loss's top
    eigenvector better than the paper's budget at fewer products); ``eig_estimator="paper"`` is
    the paper's rule at the paper's budget, 5 products every 100 steps (Algorithm 2).
    ``eig_method`` (``"power"``, ``"lanczos"``) and ``eig_schedule`` (``"burst"``,
    ``"spread"``) name the paper's family at the paper's budget. A
    rule on free products (``"secant"``) is handed, after every second pass,
    ``(g(w + ε) − g(w))/‖ε‖ = H·ε̂`` (exact on a quadratic; the Hessian of the passes' loss, in
    the model's mode during them), keeping ``g(w)`` between the passes. ``hessian_mode`` is the
    mode of ``model`` during the products: ``"eval"`` (default, as the official Eigen-SAM code:
    the products only estimate ``v̂``, and in eval mode a BatchNorm network's loss is a sum of
    per-sample terms, so they can be summed over micro-batches) or ``"train"``. Without
    ``model`` the products run in whatever mode the model is in and cannot protect its
    BatchNorm statistics.

    ``hessian_parts`` (memory-lean exact products): when ``step(closure, batch=(x, y))`` is
    given the batch, a refresh sums the exact products of ``hessian_parts`` micro-batches
    (tensors split along dimension 0, weighted by size; exact for a mean-reduced loss), one
    double-backward graph alive at a time. ``"auto"`` (default) is
    :data:`~eigensam.hessian.hvp.AUTO_HESSIAN_PARTS` (4) when ``model`` is known and no
    BatchNorm layer is in train mode during the products, else 1; a number > 1 with BatchNorm
    in train mode raises ``ValueError``. Either is capped at the batch size (one part per
    sample), and finite-difference products use the whole batch (:meth:`split_count`).
    Under ``DistributedDataParallel`` (``model`` the DDP wrapper) the products run on the inner
    module and are averaged over the replicas: ``v̂`` is the global batch loss's, the same on
    every rank, at one all-reduce per product. Under FSDP2 (``fully_shard``) ``v̂`` is stored
    sharded like the parameters (each rank keeps its rows, about ``1/N`` of it), the products
    are finite differences of FSDP's global gradients (``hvp="auto"`` picks
    :data:`~eigensam.hessian.hvp.FD_FALLBACK`; ``"autograd"`` raises ``ValueError``: double
    backward does not reach sharded parameters), the solvers' dot products and norms are
    global (Lanczos keeps its basis sharded too), and ``v̂`` is the one process's estimate on
    the concatenated batch (to rounding). :mod:`eigensam.optim.checkpoint` saves and loads
    the sharded state with ``torch.distributed.checkpoint``.

    ``reuse_gradient`` (default True): on a refresh step, the gradient the refresh computed at
    ``w`` on the same batch (same RNG state, same mode, BatchNorm statistics updated once) is the
    step's first pass, bit for bit what the closure would give again, so the closure runs once
    less. It applies when ``model`` is given, ``hessian_mode`` is the mode the model is in
    (train: with the default ``hessian_mode="eval"``, only for a model in eval mode), the model
    is not under DDP (there the refresh's gradient is this replica's) and the backend evaluates
    the whole batch at ``w`` (``"autograd"`` without parts, ``"fd-forward"``).
    """

    def __init__(
        self,
        params: Iterable[Any] | nn.Module | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        alpha: float | str = 0.2,
        *,
        eig_interval: int | None = None,
        eig_iters: int | None = None,
        eig_method: str | None = None,
        eig_schedule: str | None = None,
        eig_estimator: str | Estimator | None = None,
        hvp: str = AUTO,
        hessian_mode: str = "eval",
        hessian_parts: int | str = AUTO,
        seed: int = 0,
        reuse_gradient: bool = True,
        adaptive: bool = False,
        eta: float = 0.0,
        model: nn.Module | None = None,
        on_nonfinite: str = "raise",
        sharpness: str = "global",
        **base_kwargs: Any,
    ):
        self._alpha = self._check_alpha(alpha)
        super().__init__(
            params,
            base_optimizer,
            rho,
            adaptive=adaptive,
            eta=eta,
            model=model,
            on_nonfinite=on_nonfinite,
            sharpness=sharpness,
            **base_kwargs,
        )
        if hessian_mode not in ("train", "eval"):
            raise ValueError(f"hessian_mode must be 'train' or 'eval', got {hessian_mode!r}")
        if not isinstance(reuse_gradient, bool):
            raise TypeError(f"reuse_gradient must be a bool, got {reuse_gradient!r}")
        self.reuse_gradient = reuse_gradient
        self.tracker = EigenTracker(
            eig_interval,
            eig_iters,
            method=eig_method,
            backend=hvp,
            mode=hessian_mode,
            seed=seed,
            reduce=self.reduce,
            schedule=eig_schedule,
            estimator=eig_estimator,
        )
        if self.tracker.rule.uses_free_products and self.sharpness == "local":
            raise ValueError(FREE_PRODUCTS_LOCAL.format(self.tracker.rule.name))
        self._grad_at_w: Tensor | None = None
        self._observation: tuple[Tensor, Tensor] | None = None
        self._reusable: Evaluation | None = None
        self._refreshed_at: int | None = None  # sam_steps of the last update_eigenvector
        self._warned_missed_refresh = False
        if self.layout.sharded:  # refused now, before any pass or product
            self._check_fsdp2()
        self._set_hessian_parts(hessian_parts, self.tracker.mode, HESSIAN_PARTS_REMEDY)

    def _products_due(self) -> bool:
        return self.tracker.due(self.sam_steps)

    def _product_backend(self) -> str:
        return self.tracker.backend

    def attach_ddp(self, wrapper: DistributedDataParallel) -> None:
        """SAM's, and the tracker averages its products over the ranks too."""
        super().attach_ddp(wrapper)
        self.tracker.reduce = self.reduce

    def attach_fsdp(self) -> None:
        """SAM's, and the tracker's FSDP2 check (finite-difference products)."""
        super().attach_fsdp()
        self._check_fsdp2()

    def _check_fsdp2(self) -> None:
        """Refuse what sharded parameters cannot run: exact products."""
        check_fsdp2_options(hvp=self.tracker.requested_backend)

    def _rank_signature(self) -> dict[str, Any]:
        """SAM's, plus the refresh schedule (replicas must run the same products)."""
        return {**super()._rank_signature(), "eigenvector refresh": self.tracker.settings()}

    def _extra_defaults(self) -> dict[str, Any]:
        return {"alpha": self._alpha}

    def _check_alpha(self, alpha: object) -> Any:
        """Validate an ``alpha`` value (a real number ≥ 0)."""
        return check_nonnegative("alpha", alpha)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        self._check_alpha(group["alpha"])

    def _before_first_pass(self, closure: Callable[[], Tensor], scaler: Any) -> None:
        self._reusable = None
        if self.tracker.due(self.sam_steps):
            self.update_eigenvector(closure, scaler)
            if self.reuse_gradient and self.ddp is None:
                self._reusable = self.tracker.evaluation
            self.tracker.evaluation = None

    def _first_pass(self, closure: Callable[[], Tensor]) -> Tensor:
        """The refresh's evaluation at ``w`` when there is one (see ``reuse_gradient``), else
        the closure's."""
        reusable, self._reusable = self._reusable, None
        if reusable is None:
            return super()._first_pass(closure)
        return reusable.apply()

    @torch.no_grad()
    def _ascend(self, zero_grad: bool) -> None:
        """SAM's; a rule on free products (``tracker.rule.uses_free_products``) keeps ``g(w)``
        until ``w`` is restored."""
        self._observation = None
        if self.tracker.rule.uses_free_products:
            layout = self.layout
            self._grad_at_w = layout.flatten([p.grad for p in layout.params]).clone()
        super()._ascend(zero_grad)

    @torch.no_grad()
    def _restore_params(self) -> None:
        """SAM's; before it, with ``g(w)`` kept, the free product of the two passes."""
        if self._perturbed and self._grad_at_w is not None:
            self._observation = self._free_product()
        self._grad_at_w = None
        super()._restore_params()

    @torch.no_grad()
    def _base_step(self, scaler: Any) -> None:
        """SAM's; then the free product ``(g(w + ε) − g(w))/‖ε‖ = H·ε̂`` of this step (exact on
        a quadratic; ``ε`` the perturbation applied, read off the weights; a GradScaler's scale
        divided out) goes to the tracker's rule. Its Hessian is the one of the passes' loss, in
        the model's mode during them."""
        scale = 1.0 if scaler is None else float(scaler.get_scale())
        super()._base_step(scaler)
        observation, self._observation = self._observation, None
        if observation is not None:
            direction, product = observation
            self.tracker.observe(self._params(), direction, product.div_(scale))

    def _free_product(self) -> tuple[Tensor, Tensor] | None:
        """``(ε̂, (g(w + ε) − g(w))/‖ε‖)`` from the weights at ``w + ε``, the saved ``w``, the
        gradients now in ``p.grad`` and the kept ``g(w)``; None when ``ε = 0`` or the product
        is not finite (the step is then skipped anyway)."""
        assert self._grad_at_w is not None and self._saved_params is not None
        layout = self.layout
        eps = layout.flatten(layout.locals) - layout.flatten(self._saved_params)
        norm = float(layout.norm(eps))
        if not (math.isfinite(norm) and norm > 0):
            return None
        product = layout.flatten([p.grad for p in layout.params]).sub_(self._grad_at_w)
        product.div_(norm)
        if not math.isfinite(float(layout.amax(product))):
            return None
        return eps.div_(norm), product

    def update_eigenvector(self, closure: Callable[[], Tensor], scaler: Any = None) -> None:
        """Refresh the top-eigenvector estimate on the closure's batch (manual loops call this
        themselves when ``tracker.due(sam_steps)``, before :meth:`first_step`; a loop that
        lets a refresh fall due without calling it gets a warning once, at ``first_step``).
        Parameters' ``.grad`` are left as they were.
        A non-finite product (fp16 overflow) keeps the previous estimate, with a warning."""
        self._refreshed_at = self.sam_steps
        scale = 1.0 if scaler is None else float(scaler.get_scale())
        try:
            with local_forward(self.ddp):
                self.tracker.update(closure, self._params(), self.model, loss_scale=scale)
        except FloatingPointError as error:
            if scaler is None and self.on_nonfinite == "raise":
                raise
            warnings.warn(f"eigenvector update skipped: {error}", RuntimeWarning, stacklevel=2)

    def first_step(self, zero_grad: bool = False, scaler: Any = None) -> bool:
        """SAM's :meth:`~eigensam.optim.sam.SAM.first_step`; warns once when a refresh fell
        due at this step and :meth:`update_eigenvector` was not called (without refreshes
        ``v̂`` stays stale, or None, and the step is SAM's)."""
        due = self.tracker.due(self.sam_steps) and self._refreshed_at != self.sam_steps
        if due and not self._warned_missed_refresh:
            self._warned_missed_refresh = True
            warnings.warn(
                f"{type(self).__name__}: an eigenvector refresh was due at step {self.sam_steps} "
                "and update_eigenvector() was not called; a manual loop must call "
                "opt.update_eigenvector(closure) when opt.tracker.due(opt.sam_steps), before "
                "first_step() (opt.step(closure) does it itself). Warned once.",
                RuntimeWarning,
                stacklevel=2,
            )
        return super().first_step(zero_grad, scaler)

    def _group_slices(self) -> Iterable[tuple[dict[str, Any], slice]]:
        """Each param group with the slice of the flat parameter vector it occupies (this
        rank's part of it under FSDP2)."""
        start = 0
        shards = iter(self.layout.locals)
        for group in self.param_groups:
            size = sum(next(shards).numel() for _ in group["params"])
            yield group, slice(start, start + size)
            start += size

    STATE_KEYS = (*SAM.STATE_KEYS, "tracker")

    def state_dict(self) -> dict[str, Any]:
        """Base optimizer state, step count and the eigenvector estimate (with its RNG)."""
        return {**super().state_dict(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.tracker.load_state_dict(state_dict["tracker"])
