"""One optimizer step for any optimizer: a sharpness-aware one (two passes) or a plain
``torch.optim`` one (one pass), for training loops that switch between them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from eigensam.hessian.closures import Batch, Closure, bind_batch, call_closure
from eigensam.optim.sam import SAM, gradients_finite
from eigensam.parallel import ParamLayout


def take_step(
    optimizer: Optimizer, closure: Callable[..., Tensor], batch: Batch | None = None
) -> Tensor:
    """Take one step of ``optimizer`` with a ``torch.optim`` closure (loss, ``backward()``,
    return the loss) and return the loss, detached.

    An eigensam optimizer runs ``optimizer.step(closure, batch=batch)`` (both passes, its
    ``on_nonfinite`` policy). Any other optimizer zeroes the gradients, runs the closure once and
    steps; a NaN/inf loss or gradient raises ``FloatingPointError`` before its step, the weights
    unchanged (gradients are checked over all ranks' shards under FSDP2, and under DDP they are
    the same on every rank, so all ranks raise together). With ``batch`` the closure takes the
    batch's tensors: ``closure(*batch)`` (a dict: ``closure(**batch)``).
    """
    if isinstance(optimizer, SAM):
        return optimizer.step(closure, batch=batch)
    bound = step_closure(optimizer, closure, batch)
    optimizer.zero_grad(set_to_none=True)
    loss = call_closure(bound).detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with_grad = [p for p in params if p.grad is not None]
    # The gradients' check runs on every rank (under FSDP2 it is collective).
    finite = not with_grad or gradients_finite(ParamLayout(with_grad), [p.grad for p in with_grad])
    finite = finite and bool(torch.isfinite(loss).all())
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(
            f"non-finite loss {float(loss)} or gradient; weights were left unchanged"
        )
    optimizer.step()
    return loss


def step_closure(
    optimizer: Optimizer, closure: Callable[..., Tensor], batch: Batch | None = None
) -> Closure:
    """The zero-argument closure :func:`take_step` runs at this step: for an eigensam optimizer
    :meth:`~eigensam.optim.sam.SAM.bind` (on a step with exact Hessian-vector products a
    :class:`~eigensam.hessian.closures.SplitClosure` of its micro-batches), else the closure
    applied to the batch. For code that previews the step on the same batch (a sharpness probe
    on the unwrapped model)."""
    if isinstance(optimizer, SAM):
        return optimizer.bind(closure, batch)
    return closure if batch is None else bind_batch(closure, batch)
