"""The training engine on several processes (``torchrun``): which process this is, rank-0
output, and sums over ranks for logged losses and evaluation."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from eigensam.hessian.distributed import distributed_ready
from eigensam.lab.data import TensorData


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
