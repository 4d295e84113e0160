"""The paper's Appendix A counterexamples: Reverse-SAM and explicit gradient regularization."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from eigensam.hessian.closures import AUTO, Batch, call_closure
from eigensam.hessian.hvp import HessianOperator
from eigensam.hessian.tracker import check_tracker_backend, run_with_backend
from eigensam.optim.sam import SAM, unit
from eigensam.parallel import ParamLayout, local_forward, local_shard


class ReverseSAM(SAM):
    """SAM with the ascent reversed: ``ε = −ρ·ĝ`` (paper Appendix A, Reverse-SAM)."""

    def _ascent_direction(self, grad: Tensor) -> list[Tensor]:
        return [-d for d in super()._ascent_direction(grad)]


class EGR(SAM):
    """Explicit gradient regularization: descends ``f(w) + ρ‖∇f(w)‖`` (paper Appendix A).

    Its gradient is ``∇f + ρ·H ĝ`` with ``ĝ = ∇f/‖∇f‖`` and ``H = ∇²f``; the Hessian-vector
    product uses the ``hvp`` backend on the same batch (default ``"auto"``: exact double
    backward when the model supports it, else finite differences, decided at the first step);
    under DDP it runs on the inner module and is averaged over the replicas; under FSDP2 it is
    a finite-difference product of FSDP's global gradients on this rank's shards.
    """

    def __init__(self, *args: Any, hvp: str = AUTO, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if any(group["adaptive"] for group in self.param_groups):
            raise ValueError("adaptive=True is not defined for EGR")
        if self.sharpness == "local":
            raise ValueError("sharpness='local' is not defined for EGR, which has no ascent step")
        self.hvp = check_tracker_backend(hvp)

    def step(  # type: ignore[override]
        self,
        closure: Callable[..., Tensor] | None = None,
        scaler: Any = None,
        batch: Batch | None = None,
    ) -> Tensor:
        """Gradient of ``f + ρ‖∇f‖`` on the closure's batch (``closure(*batch)`` when ``batch``
        is given), then the base step."""
        if closure is None:
            raise TypeError(
                "EGR.step() needs a closure that computes the loss and calls backward()"
            )
        closure = self._bind(closure, batch)
        if scaler is not None:
            raise ValueError("EGR does not support a GradScaler")
        self._check_ranks()
        self.zero_grad(set_to_none=True)
        loss = call_closure(closure)
        if not self._finite(loss):
            self._nonfinite("gradient", None)
            return loss
        self._grads()
        # The Hessian is taken over the parameters that require gradients (frozen ones are
        # constants of the loss).
        params = [p for p in self._params() if p.requires_grad]
        layout = ParamLayout(params)
        grad = layout.flatten([p.grad for p in params])
        if not layout.all_true(not bool(grad.any())):

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
                return loss
            rhos = [g["rho"] for g in self.param_groups for p in g["params"] if p.requires_grad]
            with torch.no_grad():
                # A parameter the loss does not depend on has no gradient and a zero Hessian
                # row: it keeps no gradient, so the base optimizer skips it.
                for p, h, rho in zip(params, layout.unflatten(hg), rhos, strict=True):
                    if p.grad is not None:
                        local_shard(p.grad).add_(h, alpha=rho)
        self.base_optimizer.step()
        self.sam_steps += 1
        return loss
