"""The paper's Appendix A counterexamples: Reverse-SAM and explicit gradient regularization."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from eigensam.hessian.closures import AUTO, Batch
from eigensam.hessian.hvp import HessianOperator
from eigensam.hessian.tracker import check_tracker_backend, run_with_backend
from eigensam.optim.fsdp2 import check_fsdp2_options
from eigensam.optim.sam import SAM, unit
from eigensam.parallel import ParamLayout, local_forward, local_shard


class ReverseSAM(SAM):
    """SAM with the ascent reversed: ``ε = −ρ·ĝ`` (paper Appendix A, Reverse-SAM)."""

    def _ascent_direction(self, grad: Tensor) -> list[Tensor]:
        return [-d for d in super()._ascent_direction(grad)]


class EGR(SAM):
    """Explicit gradient regularization: descends ``f(w) + ρ‖∇f(w)‖`` (paper Appendix A).

    Its gradient is ``∇f + ρ·H ĝ`` with ``ĝ = ∇f/‖∇f‖`` and ``H = ∇²f``. It runs SAM's
    :meth:`~eigensam.optim.sam.SAM.step` (closure and ``batch=`` binding, the non-finite
    policy, the rank check, a detached loss) with one change: the descent gradient is ``g`` plus
    ``ρ`` times a Hessian-vector product on the same batch instead of a second gradient at
    ``w + ε``. The product uses the ``hvp`` backend (default ``"auto"``: exact double backward
    when the model supports it, else finite differences, decided at the first step); under DDP
    it runs on the inner module and is averaged over the replicas; under FSDP2 it is a
    finite-difference product of FSDP's global gradients on this rank's shards. The product
    needs the closure, so EGR has no manual loop (``first_step``/``second_step`` raise).

    ``hessian_parts`` (with ``step(closure, batch=(x, y))``): exact products summed over
    micro-batches, as :class:`~eigensam.optim.tracked.TrackedSAM`'s, with the products in train
    mode (``"auto"``: 1 when the model has BatchNorm layers). The other arguments are
    :class:`~eigensam.optim.sam.SAM`'s; ``adaptive=True`` and ``sharpness="local"`` raise
    ``ValueError`` (EGR has no ascent step).
    """

    def __init__(
        self,
        params: Iterable[Any] | nn.Module | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        hvp: str = AUTO,
        hessian_parts: int | str = AUTO,
        model: nn.Module | None = None,
        on_nonfinite: str = "raise",
        **base_kwargs: Any,
    ):
        # SAM's adaptive= and sharpness= (in base_kwargs) reach SAM, which EGR then refuses.
        super().__init__(
            params, base_optimizer, rho, model=model, on_nonfinite=on_nonfinite, **base_kwargs
        )
        if any(group["adaptive"] for group in self.param_groups):
            raise ValueError("adaptive=True is not defined for EGR")
        if self.sharpness == "local":
            raise ValueError("sharpness='local' is not defined for EGR, which has no ascent step")
        self.hvp = check_tracker_backend(hvp)
        if self.layout.sharded:
            check_fsdp2_options(hvp=self.hvp)
        self._set_hessian_parts(hessian_parts, "train", "hessian_parts=1")

    def _products_due(self) -> bool:
        return True

    def _product_backend(self) -> str:
        return self.hvp

    def step(  # type: ignore[override]
        self,
        closure: Callable[..., Tensor] | None = None,
        scaler: Any = None,
        batch: Batch | None = None,
    ) -> Tensor:
        """Gradient of ``f + ρ‖∇f‖`` on the closure's batch (``closure(*batch)`` when ``batch``
        is given), then the base step; returns the loss, detached."""
        if scaler is not None:
            raise ValueError("EGR does not support a GradScaler")
        return super().step(closure, scaler, batch)

    def first_step(self, zero_grad: bool = False, scaler: Any = None) -> bool:
        raise TypeError(
            "EGR has no manual loop: its descent gradient needs a Hessian-vector product on the "
            "closure's batch; use opt.step(closure)"
        )

    def second_step(self, zero_grad: bool = False, scaler: Any = None) -> bool:
        self.first_step()
        return False

    def _descent_gradient(self, closure: Callable[[], Tensor], scaler: Any) -> bool:
        """Add ``ρ·H ĝ`` to the gradient ``g`` in ``p.grad``; False when the product is NaN/inf
        (the step is skipped under ``on_nonfinite``)."""
        self._grads()
        # The Hessian is taken over the parameters that require gradients (frozen ones are
        # constants of the loss).
        params = [p for p in self._params() if p.requires_grad]
        layout = ParamLayout(params)
        grad = layout.flatten([p.grad for p in params])
        if layout.all_true(not bool(grad.any())):
            return True

        def product(backend: str) -> Tensor:
            operator = HessianOperator(
                closure,
                params,
                backend=backend,
                model=self.model,
                mode=None,
                base_grad=grad,
                reduce=self.reduce,
            )
            with local_forward(self.ddp), operator as op:
                return op.matvec(unit(grad, layout))

        hg, self.hvp = run_with_backend(self.hvp, params, product)
        if not layout.all_true(bool(torch.isfinite(hg).all())):
            self._nonfinite("Hessian-vector product", None)
            return False
        rhos = [g["rho"] for g in self.param_groups for p in g["params"] if p.requires_grad]
        with torch.no_grad():
            # A parameter the loss does not depend on has no gradient and a zero Hessian
            # row: it keeps no gradient, so the base optimizer skips it.
            for p, h, rho in zip(params, layout.unflatten(hg), rhos, strict=True):
                if p.grad is not None:
                    local_shard(p.grad).add_(h, alpha=rho)
        return True
