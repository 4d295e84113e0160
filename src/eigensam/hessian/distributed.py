"""Hessian-vector products of the global batch loss under ``torch.distributed`` (DDP, torchrun).

Each of the ``N`` processes holds an equal shard ``B_r`` of the global batch, so the global loss
is ``L = (1/N) Σ_r L_r`` and its Hessian-vector product is the average of the per-process
products, ``H v = (1/N) Σ_r H_r v``: one all-reduce per product (:class:`MeanAcrossRanks`, the
``reduce=`` of :class:`~eigensam.hessian.hvp.HessianOperator` and
:class:`~eigensam.hessian.tracker.EigenTracker`). DDP's reducer does not support double
backward, so the products are computed on the wrapped module (:func:`local_forward`) and
averaged explicitly. Every helper that communicates first checks that the ranks agree on what
they are about to exchange, so a mismatch raises ``ValueError`` on every rank instead of hanging.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


def is_ddp(model: object) -> TypeGuard[DistributedDataParallel]:
    """Whether ``model`` is a ``DistributedDataParallel`` wrapper."""
    return isinstance(model, DistributedDataParallel)


def unwrap(model: nn.Module | None) -> nn.Module | None:
    """The module a ``DistributedDataParallel`` wrapper holds, or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def distributed_ready() -> bool:
    """Whether a ``torch.distributed`` process group is initialized in this process."""
    return dist.is_available() and dist.is_initialized()


def require_process_group(what: str) -> None:
    """Raise ``ValueError`` naming ``what`` when no process group is initialized."""
    if not distributed_ready():
        raise ValueError(
            f"{what} needs an initialized torch.distributed process group "
            "(launch with torchrun and call torch.distributed.init_process_group), but none is "
            "initialized in this process"
        )


def check_same_across_ranks(name: str, value: Any, group: Any = None) -> None:
    """Gather ``value`` from every rank (``all_gather_object``) and raise ``ValueError`` on
    every rank, listing each rank's value (for dictionaries, the differing keys), unless they
    are all equal."""
    values: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    if all(v == values[0] for v in values):
        return
    if all(isinstance(v, dict) for v in values):  # name only the keys that differ
        keys = sorted({k for v in values for k in v if any(w.get(k) != v.get(k) for w in values)})
        values = [{k: v.get(k) for k in keys} for v in values]
    listing = "; ".join(f"rank {rank}: {v!r}" for rank, v in enumerate(values))
    raise ValueError(f"the ranks disagree on {name} ({listing}); they must be identical")


def all_ranks_true(flag: bool, group: Any = None) -> bool:
    """``flag`` AND-ed over all ranks (one all-reduce of one number)."""
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item() == 1.0)


class MeanAcrossRanks:
    """``v ↦ (1/N) Σ_r v_r``: the average of a tensor over the ``N`` ranks of ``group``, one
    ``all_reduce`` (sum, then division by ``N``) per call; every rank receives the same result,
    bit for bit. The first time a tensor of a given length is reduced, the ranks check that they
    all pass that length (ranks that disagree on the parameter count raise ``ValueError``)."""

    def __init__(self, group: Any = None):
        require_process_group("MeanAcrossRanks")
        self.group = group
        self._checked: set[int] = set()

    def __call__(self, tensor: Tensor) -> Tensor:
        if tensor.numel() not in self._checked:
            check_same_across_ranks("the length of the reduced vector", tensor.numel(), self.group)
            self._checked.add(tensor.numel())
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total.div_(dist.get_world_size(self.group))

    def __deepcopy__(self, memo: dict[int, Any]) -> MeanAcrossRanks:
        return self  # holds a process group, which cannot be copied; the callable is shared


@contextlib.contextmanager
def local_forward(model: nn.Module | None) -> Iterator[None]:
    """Within this block, calling the ``DistributedDataParallel`` wrapper ``model`` calls its
    inner module directly: no gradient all-reduce, no buffer broadcast, no reducer state touched,
    so a closure written for the wrapper can be differentiated twice (exact Hessian-vector
    products); combine with :class:`MeanAcrossRanks` to make the products global. Any other
    ``model`` (or None) is left as it is."""
    if not isinstance(model, DistributedDataParallel):
        yield
        return
    own = model.__dict__.get("forward")
    model.forward = model.module.__call__  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own  # type: ignore[method-assign]
