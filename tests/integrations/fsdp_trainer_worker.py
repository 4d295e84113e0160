"""Run by ``torchrun`` from test_transformers.py: SAMTrainer with Eigen-SAM under FSDP2
(``fsdp=True``). Each rank saves the batches it trained on and the gathered weights and ``v̂``
(on the CPU). With a checkpoint folder as third argument the run resumes from it
(``resume_from_checkpoint``).

Accelerate enables FSDP only on GPUs and other accelerators. Without CUDA the worker sets
Accelerate's state to FSDP2 after the Trainer is built (what Accelerate itself does on GPUs), so
the Trainer's FSDP2 path (sharding in ``train()``, the optimizer's parameter swap, the FSDP
checkpoints) runs on gloo."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from tiny_hf import recording_trainer
from torch.distributed.tensor import DTensor

from eigensam.integrations.transformers import SAMTrainer


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def force_fsdp2(trainer: SAMTrainer) -> None:
    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    trainer.is_fsdp_enabled = True


def main(folder: Path, accumulation: int, resume: str | None) -> None:
    trainer = recording_trainer(
        folder,
        accumulation,
        max_steps=4,
        warmup_steps=0,
        lr_scheduler_type="constant",
        use_cpu=not torch.cuda.is_available(),
        fsdp=True,
        save_strategy="steps",
        save_steps=2,
    )
    opt = trainer.eigensam_optimizer
    if not trainer.is_fsdp_enabled:
        force_fsdp2(trainer)
    trainer.train(resume_from_checkpoint=resume)
    torch.save(
        {
            "seen": [{k: v.cpu() for k, v in batch.items()} for batch in trainer.seen],
            "params": [full(p) for p in trainer.model.parameters()],
            "vector": opt.layout.full(opt.tracker.vector).cpu(),
            "sharded": opt.layout.sharded,
            "steps": opt.sam_steps,
        },
        folder / f"rank{os.environ['RANK']}.pt",
    )
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
