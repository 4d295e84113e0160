"""SAM, Eigen-SAM or X-SAM on a model sharded with FSDP2 (``fully_shard``), launched with torchrun.

    torchrun --standalone --nproc_per_node 2 examples/fsdp_train.py \
        [--optimizer eigen-sam|sam|x-sam] [--epochs 3] [--bf16] \
        [--checkpoint fsdp_example] [--resume]

A small pre-norm transformer classifies synthetic token sequences (so the script runs anywhere:
CPUs with gloo, or one GPU per process with NCCL). Every block, then the root, is sharded with
``fully_shard``; the optimizer gets the sharded module and the base optimizer works on its
``DTensor`` parameters. ε comes from the global gradient norm, Eigen-SAM's v̂ is stored sharded
like the parameters and refreshed with finite-difference products (``hvp="auto"``). Every rank
writes its shards of the model and optimizer state with ``torch.distributed.checkpoint`` into
a fresh folder after each epoch, which then replaces the ``--checkpoint`` folder; ``--resume``
loads it (on any number of processes: DCP reshards). ``--bf16`` computes in bfloat16
(``MixedPrecisionPolicy``), with float32 shards.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from eigensam import SAM, XSAM, EigenSAM
from eigensam.optim.checkpoint import distributed_state_dict, load_distributed_state_dict

VOCAB, LENGTH, CLASSES = 32, 16, 4


class Classifier(nn.Module):
    """Token and position embeddings, ``depth`` pre-norm encoder blocks, mean pool, linear."""

    def __init__(self, dim: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.position = nn.Parameter(0.02 * torch.randn(LENGTH, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def synthetic_data(n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token sequences; the label is which quarter of the vocabulary is most frequent."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    counts = F.one_hot(tokens // (VOCAB // CLASSES), CLASSES).sum(dim=1)
    return tokens, counts.argmax(dim=1)


def make_optimizer(name: str, model: nn.Module) -> SAM:
    adamw = dict(lr=1e-3, weight_decay=1e-2)
    if name == "sam":
        return SAM(model, torch.optim.AdamW, rho=0.05, **adamw)
    tracked = dict(eig_interval=20, eig_iters=5)  # hvp="auto": finite differences under FSDP2
    if name == "x-sam":
        return XSAM(model, torch.optim.AdamW, rho=0.05, alpha=1.0, **tracked, **adamw)
    return EigenSAM(model, torch.optim.AdamW, rho=0.05, alpha=0.2, **tracked, **adamw)


def checkpoint_state(model: nn.Module, opt: SAM, epoch: int) -> dict:
    return {
        "optimizer": distributed_state_dict(opt),
        "model": get_model_state_dict(model),
        "epoch": epoch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="eigensam on an FSDP2 model under torchrun")
    parser.add_argument("--optimizer", choices=("sam", "eigen-sam", "x-sam"), default="eigen-sam")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute")
    parser.add_argument("--checkpoint", type=Path, default=Path("fsdp_example"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank before sharding
    model = Classifier().to(device)
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    extra = {"mp_policy": policy} if args.bf16 else {}
    for block in model.blocks:
        fully_shard(block, mesh=mesh, **extra)
    fully_shard(model, mesh=mesh, **extra)
    opt = make_optimizer(args.optimizer, model)

    start_epoch = 0
    if args.resume:
        state = checkpoint_state(model, opt, 0)
        dcp.load(state, checkpoint_id=str(args.checkpoint))
        set_model_state_dict(model, state["model"])
        load_distributed_state_dict(opt, state["optimizer"])
        start_epoch = state["epoch"]

    tokens, labels = synthetic_data()
    per_rank = args.batch_size // world
    for epoch in range(start_epoch, args.epochs):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        total = torch.zeros(2, device=device)
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            batch = order[start : start + args.batch_size][rank * per_rank : (rank + 1) * per_rank]
            x, y = tokens[batch].to(device), labels[batch].to(device)

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                loss = F.cross_entropy(model(x).float(), y)
                loss.backward()
                return loss

            loss = opt.step(closure)
            total += torch.stack([loss.detach() * len(y), torch.tensor(len(y), device=device)])
        dist.all_reduce(total)
        # Every rank writes its shards into a fresh folder, which then replaces the previous
        # checkpoint: a crash while saving leaves the previous one whole.
        fresh = args.checkpoint.with_name(args.checkpoint.name + ".new")
        dcp.save(checkpoint_state(model, opt, epoch + 1), checkpoint_id=str(fresh))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(args.checkpoint, ignore_errors=True)
            fresh.rename(args.checkpoint)
        dist.barrier()
        if rank == 0:
            eigen = getattr(opt, "tracker", None)
            record = {"epoch": epoch + 1, "train_loss": float(total[0] / total[1])}
            if eigen is not None:
                record["top_eigenvalue"] = eigen.eigenvalue
            print(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
