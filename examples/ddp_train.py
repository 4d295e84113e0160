"""SAM, Eigen-SAM or X-SAM under DistributedDataParallel, launched with torchrun.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py \
        [--optimizer eigen-sam|sam|x-sam] [--sharpness global|local] [--epochs 3] \
        [--checkpoint ddp_example.pt] [--resume]

Every process trains on its ``DistributedSampler`` shard of a synthetic 10-class problem (so the
script runs anywhere: CPUs with gloo, or one GPU per process with NCCL and SyncBatchNorm). The
optimizer is given the DDP wrapper and the closure calls the wrapper: with
``--sharpness global`` (default) every replica perturbs with the all-reduced gradient (the
algorithm of one process with the whole batch); with ``--sharpness local`` each replica
perturbs with its own gradient (m-sharpness). Eigen-SAM's eigenvector is the global batch's
on every rank. Rank 0 writes the checkpoint (atomically); ``--resume`` loads it on every rank.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from eigensam import SAM, XSAM, EigenSAM
from eigensam.atomic import atomic_write


def synthetic_data(n: int = 4096, dim: int = 20, classes: int = 10) -> TensorDataset:
    """Inputs from N(0, I), labels from a fixed random linear teacher plus noise (seed 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    teacher = torch.randn(dim, classes, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def make_optimizer(name: str, ddp: nn.Module, sharpness: str) -> SAM:
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    if name == "sam":
        return SAM(ddp, torch.optim.SGD, rho=0.05, sharpness=sharpness, **sgd)
    tracked = dict(eig_interval=20, eig_iters=5, sharpness=sharpness)
    if name == "x-sam":
        return XSAM(ddp, torch.optim.SGD, rho=0.05, alpha=1.0, **tracked, **sgd)
    return EigenSAM(ddp, torch.optim.SGD, rho=0.05, alpha=0.2, **tracked, **sgd)


def main() -> None:
    parser = argparse.ArgumentParser(description="eigensam under torchrun/DDP")
    parser.add_argument("--optimizer", choices=("sam", "eigen-sam", "x-sam"), default="eigen-sam")
    parser.add_argument("--sharpness", choices=("global", "local"), default="global")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--checkpoint", type=Path, default=Path("ddp_example.pt"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if cuda else "cpu")

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.GELU(), nn.Linear(64, 10)).to(
        device
    )
    if cuda:  # SyncBatchNorm needs GPUs; its buffers are protected like BatchNorm's
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = make_optimizer(args.optimizer, ddp, args.sharpness)

    start_epoch = 0
    if args.resume:
        state = torch.load(args.checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]

    data = synthetic_data()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=args.batch_size // world, sampler=sampler)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2, device=device)
        for x, y in loader:
            x, y = x.to(device), y.to(device)

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                loss = F.cross_entropy(ddp(x), y)  # the closure calls the DDP wrapper
                loss.backward()
                return loss

            loss = opt.step(closure)
            total += torch.stack([loss.detach() * len(y), torch.tensor(len(y), device=device)])
        dist.all_reduce(total)
        if rank == 0:
            eigen = getattr(opt, "tracker", None)
            lam = "" if eigen is None else f", top eigenvalue estimate {eigen.eigenvalue:.4f}"
            print(f"epoch {epoch + 1}: train loss {float(total[0] / total[1]):.4f}{lam}")
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1}
            atomic_write(args.checkpoint, lambda f, state=state: torch.save(state, f))
        dist.barrier()  # the checkpoint is complete before any rank may read it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
