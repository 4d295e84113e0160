"""Run by ``torchrun --nproc_per_node 2`` from test_transformers.py: SAMTrainer with Eigen-SAM
under DDP on CPU (with ``fsdp=True`` too, which the CPU runs as DDP); each rank saves the
batches it trained on, its final weights and ``v̂``, and whether SAMTrainer warned."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from tiny_hf import recording_trainer


def main(folder: Path, accumulation: int, fsdp: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = recording_trainer(
            folder,
            accumulation,
            max_steps=3,
            warmup_steps=0,
            lr_scheduler_type="constant",
            fsdp=fsdp,
        )
    warned = any("Accelerate enables FSDP only on" in str(w.message) for w in caught)
    trainer.train()
    model, opt = trainer.model, trainer.eigensam_optimizer
    rank = int(os.environ["RANK"])
    torch.save(
        {
            "seen": trainer.seen,
            "params": [p.detach() for p in model.parameters()],
            "vector": opt.tracker.vector,
            "bound": opt.ddp is not None,
            "warned": warned,
        },
        folder / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3])))
