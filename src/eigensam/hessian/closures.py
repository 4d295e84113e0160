"""Closures and batches for Hessian-vector products and the optimizers: binding a closure to a
batch (``closure(*batch)``), splitting a batch into micro-batches whose losses sum to the batch's
(:class:`SplitClosure`), and choosing how many (``hessian_parts``).

A closure follows ``torch.optim``: it computes the loss, calls ``backward()`` and returns the loss.
Exact products (double backward) of a :class:`SplitClosure` are summed over its parts, one part's
graph alive at a time: ``H v = sum_k w_k (∇²L_k) v``, the same product at a fraction of the memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

Closure = Callable[[], Tensor]
AUTO = "auto"
# hessian_parts="auto": one part's double-backward graph takes a few times a gradient's memory,
# so 4 parts keep an eigenvector refresh's peak near SAM's step (3 parts left ResNet-18 at batch
# 64 well above it, at the same refresh time on SimpleCNN; the eigen-sam rows of the memory
# table in docs/cost.md, from benchmarks/bench_optimizers.py, are 4 parts).
AUTO_HESSIAN_PARTS = 4


def call_closure(closure: Closure) -> Tensor:
    """Run a torch.optim-style closure with gradients enabled; refuse one that returns no loss."""
    with torch.enable_grad():
        loss = closure()
    if not isinstance(loss, Tensor):
        raise TypeError(
            "closure must compute the loss, call loss.backward() and return the loss tensor; "
            f"it returned {type(loss).__name__}"
        )
    return loss


class SplitClosure:
    """A whole-batch closure together with closures for its parts (micro-batches) whose weighted
    losses sum to the whole batch's loss, ``L = sum_k weights[k]·L_k`` (default weights 1).

    Calling it runs the whole-batch closure, so it can be passed wherever a closure goes (the
    optimizers' ``step``). ``HessianOperator(backend="autograd")`` uses ``parts`` for products,
    ``H v = sum_k weights[k]·(∇²L_k) v``. The sum is exact when the loss is a sum (or, with the
    weights ``n_k/n`` of :func:`batch_split_closure`, a mean) of per-sample terms; BatchNorm in
    train mode couples the samples of a batch, so the operator refuses parts then (see
    :class:`HessianOperator` and :func:`hessian_parts_for`).
    """

    def __init__(
        self, closure: Closure, parts: Sequence[Closure], weights: Sequence[float] | None = None
    ):
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self.closure = closure
        self.parts = list(parts)
        if not self.parts or not all(callable(part) for part in self.parts):
            raise ValueError(f"parts must be a non-empty sequence of closures, got {parts!r}")
        self.weights = [1.0] * len(self.parts) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.parts):
            raise ValueError(
                f"weights must have one entry per part ({len(self.parts)}), got {len(self.weights)}"
            )

    def __call__(self) -> Tensor:
        return self.closure()


Batch = Sequence[object] | Mapping[str, object]


def batch_values(batch: Batch) -> Iterable[object]:
    """The values of ``batch``: a tuple/list of a closure's positional arguments or a dict of its
    keyword arguments; TypeError for anything else."""
    if isinstance(batch, Mapping):
        return batch.values()
    if isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        return batch
    raise TypeError(
        f"batch must be a tuple/list of the closure's arguments or a dict of its keyword "
        f"arguments, got {type(batch).__name__}"
    )


def batch_size_of(batch: Batch) -> int:
    """Length along dimension 0 of the first tensor of ``batch`` (a sequence of positional
    arguments or a mapping of keyword arguments); ValueError if it holds no tensor."""
    for value in batch_values(batch):
        if isinstance(value, Tensor) and value.dim() > 0:
            return len(value)
    raise ValueError(
        f"batch must contain at least one tensor with a batch dimension, got {batch!r}"
    )


def bind_batch(closure: Callable[..., Tensor], batch: Batch) -> Closure:
    """The zero-argument closure ``closure(*batch)`` (a mapping: ``closure(**batch)``)."""
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    batch_values(batch)
    if isinstance(batch, Mapping):
        return lambda: closure(**batch)
    return lambda: closure(*batch)


def batch_split_closure(closure: Callable[..., Tensor], batch: Batch, parts: int) -> SplitClosure:
    """A :class:`SplitClosure` of ``closure(*batch)`` whose ``parts`` micro-batches take every
    tensor of ``batch`` split along dimension 0 (``torch.tensor_split``: sizes ``n_k`` differ by
    at most 1; other values are passed unchanged), weighted ``n_k/n``: exact when the closure's
    loss is the mean of per-sample terms, as with ``reduction="mean"`` losses."""
    n = batch_size_of(batch)
    if isinstance(parts, bool) or not isinstance(parts, int) or not 1 <= parts <= n:
        raise ValueError(
            f"hessian_parts must be an int in [1, {n}] (the batch has {n} samples), got {parts!r}"
        )

    def piece(value: object, k: int) -> object:
        if isinstance(value, Tensor) and value.dim() > 0 and len(value) == n:
            return value.tensor_split(parts)[k]
        return value

    pieces: list[Batch] = []
    for k in range(parts):
        if isinstance(batch, Mapping):
            pieces.append({key: piece(value, k) for key, value in batch.items()})
        else:
            pieces.append([piece(value, k) for value in batch])
    sizes = [batch_size_of(p) for p in pieces]
    return SplitClosure(
        bind_batch(closure, batch),
        [bind_batch(closure, p) for p in pieces],
        [size / n for size in sizes],
    )


def split_closure(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    parts: int = 1,
    backward: Callable[[Tensor], None] | None = None,
) -> SplitClosure:
    """:func:`batch_split_closure` of ``loss_fn(model(inputs), targets)`` with ``parts``
    micro-batches; ``backward(loss)`` is called on each loss (default ``loss.backward()``; pass
    ``lambda loss: scaler.scale(loss).backward()`` with a GradScaler)."""

    def closure(x: Tensor, y: Tensor) -> Tensor:
        loss = loss_fn(model(x), y)
        if backward is None:
            loss.backward()
        else:
            backward(loss)
        return loss

    return batch_split_closure(closure, (inputs, targets), parts)


def hessian_parts_for(
    requested: int | str,
    model: nn.Module | None,
    mode: str | None,
    *,
    remedy: str = "hessian_mode='eval' or hessian_parts=1",
) -> int:
    """The number of micro-batches for exact products: ``requested``, or for ``"auto"``
    :data:`AUTO_HESSIAN_PARTS` when ``model`` is given and no BatchNorm layer of it is in train
    mode during the products (``mode``; None: as the model is now), else 1. An explicit number
    > 1 with BatchNorm in train mode raises ValueError (the parts' batch statistics would differ
    from the batch's), suggesting ``remedy``. The caller caps the result at the batch size.
    """
    check_hessian_parts(requested)
    coupled = [
        name
        for name, m in (model.named_modules() if model is not None else ())
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.training if mode is None else mode == "train")
    ]
    if requested == AUTO:
        return AUTO_HESSIAN_PARTS if model is not None and not coupled else 1
    assert isinstance(requested, int)
    if coupled and requested > 1:
        raise ValueError(
            f"hessian_parts={requested} splits the batch of the Hessian-vector products, but "
            f"BatchNorm layers ({', '.join(coupled)}) are in train mode during them (their batch "
            f"statistics would differ per part); use {remedy}"
        )
    return requested


def check_hessian_parts(value: object) -> int | str:
    """Return ``value`` if it is a positive int or ``"auto"``, else raise naming the argument."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"hessian_parts must be a positive int or 'auto', got {value!r}")
    if value < 1:
        raise ValueError(f"hessian_parts must be a positive int or 'auto', got {value}")
    return value
