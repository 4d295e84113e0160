"""The training engine on several processes (``torchrun``): which process this is, rank-0
output, sums over ranks for logged losses and evaluation, and FSDP2 sharding of a model."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.optim import Optimizer

from eigensam.lab.workloads.datasets import TensorData
from eigensam.optim.checkpoint import distributed_state_dict, load_distributed_state_dict
from eigensam.optim.sam import SAM
from eigensam.parallel import distributed_ready, reshard


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, checkpoints and writes results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_created_group = False  # whether join() initialized the default process group


def join(device: str) -> Ranks:
    """Join the job ``torchrun`` started (``WORLD_SIZE`` > 1 in the environment) by initializing
    the default process group (NCCL for a CUDA ``device``, gloo otherwise), or use the group
    already initialized; a lone process is rank 0 of 1. A process whose group is created here
    ends with :func:`leave`."""
    global _created_group
    if not distributed_ready() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
        _created_group = True
    if not distributed_ready():
        return Ranks()
    rank = dist.get_rank()
    return Ranks(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def leave(code: int) -> None:
    """End this process with exit status ``code`` if :func:`join` started its process group (a
    torchrun job); otherwise return, leaving a group the caller initialized to the caller.

    After success (``code`` 0, every rank past its last collective) the group is destroyed
    first. Standard output and error are flushed, and the process ends without the
    interpreter's shutdown (``os._exit``): DDP keeps the gloo group alive after
    ``destroy_process_group``, and a gloo worker thread that frees a finished collective's
    tensors while the interpreter shuts down cannot take the GIL and aborts the finished
    process ("terminate called without an active exception", SIGABRT; seen in a core dump,
    counted by ``benchmarks/torchrun_exit.py``). Every file the engine writes is closed by then."""
    if not _created_group:
        return
    if code == 0 and distributed_ready():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_main() -> bool:
    """Whether this process is rank 0 (always, outside a distributed job)."""
    return not distributed_ready() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing outside a distributed job)."""
    if distributed_ready():
        dist.barrier()


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (float64, one all-reduce)."""
    if not distributed_ready():
        return values
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def rank_shard(data: TensorData, ranks: Ranks) -> TensorData:
    """Samples ``rank, rank + N, rank + 2N, ...`` of ``data``: the ranks' shards are disjoint
    and cover it (evaluation)."""
    step = ranks.world_size
    return TensorData(data.images[ranks.rank :: step], data.labels[ranks.rank :: step])


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does before a forward
    pass: evaluation and checkpoints then see the same model on every rank."""
    if distributed_ready():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def is_shard_unit(module: nn.Module) -> bool:
    """Whether ``module`` is sharded on its own by :func:`shard_model`: a residual block of the
    lab's models (class name ending in ``Block`` or ``Bottleneck``: the ViT's transformer
    blocks, the ResNets' and WideResNet's blocks)."""
    return type(module).__name__.endswith(("Block", "Bottleneck"))


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` over all ranks with FSDP2: ``fully_shard`` on every block
    (:func:`is_shard_unit`, so one block's weights are gathered at a time), then on the root,
    on a 1-D device mesh of the parameters' device type. Returns ``model`` (now an FSDP module
    whose parameters are ``DTensor`` shards)."""
    if not distributed_ready():
        raise ValueError(
            "sharding a model (strategy fsdp) needs an initialized torch.distributed process "
            "group: launch with torchrun"
        )
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in [m for m in model.modules() if m is not model and is_shard_unit(m)]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sharded_state(model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """The model's and optimizer's state as ``torch.distributed.checkpoint`` saves and loads
    it: every rank's shards (``get_model_state_dict``; the SAM family through
    :func:`~eigensam.optim.checkpoint.distributed_state_dict`, other optimizers through
    ``get_optimizer_state_dict``)."""
    reshard(model)  # after an evaluation the root's gathered parameters are registered
    opt_state = (
        distributed_state_dict(optimizer)
        if isinstance(optimizer, SAM)
        else get_optimizer_state_dict(model, optimizer)
    )
    return {"model": get_model_state_dict(model), "optimizer": opt_state}


def save_sharded(
    folder: Path, model: nn.Module, optimizer: Optimizer, extra: dict[str, Any] | None = None
) -> None:
    """Every rank writes its shards of :func:`sharded_state`, and of ``extra`` (more entries,
    such as the sharpness probe's sharded vectors), into ``folder`` (collective)."""
    dcp.save({**sharded_state(model, optimizer), **(extra or {})}, checkpoint_id=str(folder))


def load_sharded(
    folder: Path, model: nn.Module, optimizer: Optimizer, extra: dict[str, Any] | None = None
) -> None:
    """Load what :func:`save_sharded` wrote (collective), resharded to this job's ranks;
    ``extra``'s entries that the folder holds are loaded into it in place (those it lacks,
    written before they existed, are left as they are)."""
    state = sharded_state(model, optimizer)
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    present = {key for key in extra or {} if any(name.startswith(f"{key}.") for name in saved)}
    dcp.load({**state, **{key: extra[key] for key in present if extra}}, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    if isinstance(optimizer, SAM):
        load_distributed_state_dict(optimizer, state["optimizer"])
    else:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_sharded_weights(folder: Path, model: nn.Module) -> Tensor | None:
    """Into the whole ``model`` of one process, the weights that :func:`save_sharded` wrote
    (DCP gathers the shards); returns the optimizer's eigenvector estimate ``v̂`` as one flat
    vector in parameter order (None when the optimizer has none, or had none yet)."""
    weights = model.state_dict()
    pieces = [torch.zeros_like(p) for p in model.parameters()]
    tracker: dict[str, Any] = {"vector": pieces, "has_vector": False}
    metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    has_tracker = "optimizer.tracker.has_vector" in metadata
    state: dict[str, Any] = {"model": weights}
    if has_tracker:
        state["optimizer"] = {"tracker": tracker}
    dcp.load(state, checkpoint_id=str(folder))
    model.load_state_dict(weights)
    if not has_tracker or not tracker["has_vector"]:
        return None
    return torch.cat([piece.reshape(-1) for piece in pieces])
