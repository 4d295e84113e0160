"""Hessian-vector products of the global batch loss under ``torch.distributed`` (DDP, torchrun).

Each of the ``N`` processes holds an equal shard ``B_r`` of the global batch, so the global loss
is ``L = (1/N) Σ_r L_r`` and its Hessian-vector product is the average of the per-process
products, ``H v = (1/N) Σ_r H_r v``: one all-reduce per product (:class:`MeanAcrossRanks`, the
``reduce=`` of :class:`~eigensam.hessian.hvp.HessianOperator` and
:class:`~eigensam.hessian.tracker.EigenTracker`). DDP's reducer does not support double
backward, so the products are computed on the wrapped module (:func:`local_forward`) and
averaged explicitly. Every helper that communicates first checks that the ranks agree on what
they are about to exchange, so a mismatch raises ``ValueError`` on every rank instead of hanging.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter and gradient is a
``DTensor`` of which each rank holds a slice of rows, and the gradients are already those of the
global batch loss (FSDP reduce-scatters them). :class:`ParamLayout` keeps flat vectors (the
gradient, ``ε``, ``v̂``, Hessian-vector products) as this rank's slices and makes sums over their
entries (norms, dot products, maxima) global with one all-reduce of one number; element-wise
work needs no communication. Double backward does not reach the sharded parameters (the graph
uses the gathered ones), so only gradient-based (finite-difference) products exist there.
FSDP1 (``FullyShardedDataParallel``) is refused (:func:`refuse_fsdp1`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, TypeGuard, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
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


# --------------------------------------------------------------------------------------------
# Sharded models (FSDP2, ``torch.distributed.fsdp.fully_shard``)
# --------------------------------------------------------------------------------------------


def is_fsdp1(model: object) -> bool:
    """Whether ``model`` is, or contains, a ``FullyShardedDataParallel`` (FSDP1) wrapper."""
    if not isinstance(model, nn.Module):
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def is_fsdp2(model: object) -> bool:
    """Whether ``model`` is, or contains, a module sharded by ``fully_shard`` (FSDP2)."""
    if not isinstance(model, nn.Module):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def reshard(model: object) -> None:
    """Put every FSDP2 module of ``model`` back in its sharded state. A forward pass without
    backward (evaluation) leaves the root module's gathered parameters registered, so that
    ``named_parameters()`` yields whole tensors instead of the ``DTensor`` shards that the
    optimizer holds (and checkpoints key by name); nothing for other models."""
    if not isinstance(model, nn.Module):
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def refuse_fsdp1(model: object) -> None:
    """Raise ``TypeError`` if ``model`` holds an FSDP1 wrapper (its flat parameters hide the
    model's tensors; eigensam supports FSDP2)."""
    if is_fsdp1(model):
        raise TypeError(
            "model is (or contains) a torch.distributed.fsdp.FullyShardedDataParallel (FSDP1) "
            "wrapper, which eigensam does not support: shard the model with FSDP2 "
            "(torch.distributed.fsdp.fully_shard), or use DistributedDataParallel"
        )


def local_shard(tensor: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (sharing its storage: in-place changes write through),
    or ``tensor`` itself."""
    if isinstance(tensor, DTensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


def flatten_pieces(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Concatenate ``tensors`` into one flat vector; ``None`` entries become zeros shaped as
    the matching entry of ``like`` (the dtype is the promotion of all, as ``torch.cat``)."""
    return torch.cat(
        [
            (t if t is not None else torch.zeros_like(p)).reshape(-1)
            for t, p in zip(tensors, like, strict=True)
        ]
    )


class ParamLayout:
    """How a list of parameters lies over the ranks, and the vector algebra that follows.

    *Replicated* (plain tensors: one process, or DDP where every rank holds all of ``w``): flat
    vectors are ``cat(p.reshape(-1))`` and norms and dot products are the plain ones.

    *Sharded* (every parameter a ``DTensor`` placed ``Shard(0)`` on one 1-D device mesh, as
    ``fully_shard`` leaves them): a *sharded flat vector* is the concatenation of this rank's
    shards, ``x_r = cat(local(p).reshape(-1))``, so the global vector ``x`` is the disjoint union
    of the ``x_r`` (in a rank-major order) and every rank stores about ``1/N`` of it. Sums over
    entries are global: ``⟨a, b⟩ = Σ_r ⟨a_r, b_r⟩`` and ``‖a‖ = (Σ_r ‖a_r‖²)^½`` (one all-reduce of
    one number), ``max|a_i|`` an all-reduce of the local maxima; each rank receives the same value.
    Element-wise operations need no communication. :meth:`full` and :meth:`shard` convert to and
    from the parameter-order vector of one process.
    """

    def __init__(self, params: Sequence[Tensor]):
        self.params = list(params)
        if not self.params:
            raise ValueError("params must hold at least one tensor")
        dtensors = [isinstance(p, DTensor) for p in self.params]
        self.sharded = any(dtensors)
        self.group: Any = None
        self.mesh: Any = None
        if not self.sharded:
            self.locals = self.params
            return
        if not all(dtensors):
            plain = [i for i, d in enumerate(dtensors) if not d]
            raise ValueError(
                f"parameters {plain} are plain tensors while the others are DTensors (FSDP2): "
                "apply fully_shard to the root module too, so that every parameter is sharded"
            )
        mesh = self.params[0].device_mesh  # type: ignore[attr-defined]
        for i, p in enumerate(self.params):
            placements = tuple(p.placements)  # type: ignore[attr-defined]
            if p.device_mesh != mesh or mesh.ndim != 1 or placements != (Shard(0),):  # type: ignore[attr-defined]
                raise ValueError(
                    f"parameter {i} is a DTensor placed {placements} on {p.device_mesh}; "  # type: ignore[attr-defined]
                    "eigensam supports parameters sharded Shard(0) on one 1-D device mesh "
                    "(fully_shard with a 1-D mesh)"
                )
        self.mesh = mesh
        self.group = mesh.get_group()
        self.locals = [local_shard(p) for p in self.params]

    # -- layout -------------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        """Entries of a flat vector on this rank."""
        return sum(p.numel() for p in self.locals)

    @property
    def global_numel(self) -> int:
        """Entries of the whole (parameter-order) vector."""
        return sum(p.numel() for p in self.params)

    def local(self, tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
        """This rank's shards of per-parameter tensors (gradients, parameters; None stays)."""
        return [None if t is None else local_shard(t) for t in tensors]

    def flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """The (sharded) flat vector of per-parameter tensors; None entries are zeros."""
        return flatten_pieces(self.local(tensors), self.locals)

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Views of a (sharded) flat vector shaped as this rank's parameter shards."""
        sizes = [p.numel() for p in self.locals]
        if vector.shape != (sum(sizes),):
            raise ValueError(
                f"vector has shape {tuple(vector.shape)}, this rank's parameters have "
                f"{sum(sizes)} entries"
            )
        return [c.view_as(p) for c, p in zip(vector.split(sizes), self.locals, strict=True)]

    # -- global reductions --------------------------------------------------------------------

    def sum(self, value: Tensor) -> Tensor:
        """``value`` summed over the ranks (sharded), or ``value`` (replicated)."""
        if not self.sharded:
            return value
        total = value.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        """``⟨a, b⟩`` of two flat vectors."""
        return self.sum(torch.dot(a, b))

    def norm(self, a: Tensor) -> Tensor:
        """``‖a‖₂`` of a flat vector."""
        if not self.sharded:
            return a.norm()
        return self.sum(a.norm().square()).sqrt()

    def norm_of(self, tensors: Sequence[Tensor]) -> Tensor:
        """``‖·‖₂`` of per-parameter tensors taken together (their shards, when sharded)."""
        shards = [t for t in self.local(tensors) if t is not None]
        local = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(shards)))
        return local if not self.sharded else self.sum(local.square()).sqrt()

    def amax(self, a: Tensor) -> Tensor:
        """``max_i |a_i|`` of a flat vector (0 for an empty shard)."""
        local = a.abs().amax() if a.numel() else a.new_zeros(())
        if not self.sharded:
            return local
        total = local.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=self.group)
        return total

    def all_true(self, flag: bool) -> bool:
        """``flag`` AND-ed over the ranks that share the parameters."""
        return flag if not self.sharded else all_ranks_true(flag, self.group)

    # -- conversions --------------------------------------------------------------------------

    def pieces(self, vector: Tensor) -> list[Tensor]:
        """A flat vector as per-parameter tensors shaped like the parameters: ``DTensor``
        sharing the vector's storage (sharded), or views (replicated); for
        ``torch.distributed.checkpoint``, which reshards them to another world size."""
        views = self.unflatten(vector)
        if not self.sharded:
            return views
        return [
            DTensor.from_local(
                view,
                self.mesh,
                [Shard(0)],
                run_check=False,
                shape=p.shape,
                stride=p.stride(),
            )
            for view, p in zip(views, self.params, strict=True)
        ]

    def from_pieces(self, pieces: Sequence[Tensor]) -> Tensor:
        """The flat vector of per-parameter tensors shaped like the parameters (inverse of
        :meth:`pieces`; plain tensors of the whole shape are cut to this rank's shards)."""
        if len(pieces) != len(self.params):
            raise ValueError(f"got {len(pieces)} pieces for {len(self.params)} parameters")
        shards = []
        for i, (piece, p) in enumerate(zip(pieces, self.params, strict=True)):
            if piece.shape != p.shape:
                raise ValueError(
                    f"piece {i} has shape {tuple(piece.shape)}, parameter {i} {tuple(p.shape)}"
                )
            if self.sharded and not isinstance(piece, DTensor):
                piece = distribute_tensor(piece, self.mesh, [Shard(0)], src_data_rank=None)
            shards.append(local_shard(piece))
        return flatten_pieces(shards, self.locals)

    def full(self, vector: Tensor) -> Tensor:
        """The whole flat vector in parameter order (the vector of one process holding all of
        ``w``), on every rank; an all-gather per parameter when sharded."""
        if not self.sharded:
            return vector
        whole = [cast(DTensor, piece).full_tensor() for piece in self.pieces(vector)]
        return flatten_pieces(whole, self.params)

    def shard(self, vector: Tensor) -> Tensor:
        """This rank's sharded flat vector cut from the whole parameter-order ``vector`` (the
        same on every rank; no communication)."""
        if vector.shape != (self.global_numel,):
            raise ValueError(
                f"vector has shape {tuple(vector.shape)}, the parameters have "
                f"{self.global_numel} entries"
            )
        if not self.sharded:
            return vector
        sizes = [p.numel() for p in self.params]
        whole = [c.view(p.shape) for c, p in zip(vector.split(sizes), self.params, strict=True)]
        return self.from_pieces(whole)
