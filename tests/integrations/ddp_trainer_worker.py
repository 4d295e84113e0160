"""Run by ``torchrun --nproc_per_node 2`` from test_transformers.py: SAMTrainer with Eigen-SAM
under DDP on CPU; each rank saves the batches it trained on, its final weights and ``v̂``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from tiny_hf import RecordingTrainer, TokenData, arguments, eigen_sam, tiny_gpt


def main(folder: Path, accumulation: int) -> None:
    model = tiny_gpt()
    opt = eigen_sam(model)
    args = arguments(
        folder,
        max_steps=3,
        warmup_steps=0,
        lr_scheduler_type="constant",
        gradient_accumulation_steps=accumulation,
    )
    trainer = RecordingTrainer(
        model=model, args=args, train_dataset=TokenData(), optimizers=(opt, None)
    )
    trainer.seen = []
    trainer.train()
    rank = int(os.environ["RANK"])
    torch.save(
        {
            "seen": trainer.seen,
            "params": [p.detach() for p in model.parameters()],
            "vector": opt.tracker.vector,
            "bound": opt.ddp is not None,
        },
        folder / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
