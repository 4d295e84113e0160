"""The tiny training configuration of the engine's tests: 96 synthetic samples in batches of 32,
3 steps per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eigensam.lab.engine.config import TrainConfig

TINY: dict[str, Any] = dict(
    dataset="synthetic",
    train_subset=96,
    model="simplecnn",
    width=0.25,
    epochs=2,
    batch_size=32,
    log_every=1,
    track_iters=8,
)
# A tiny ResNet-18: BatchNorm buffers that tracking and the second pass must not change.
TINY_BN: dict[str, Any] = dict(TINY, model="resnet18", width=0.0625)


def tiny(tmp_path: Path, name: str = "run", **overrides: Any) -> TrainConfig:
    """``TINY`` with ``overrides``, run in ``tmp_path/name``."""
    return TrainConfig(**{**TINY, "out_dir": str(tmp_path / name), **overrides})
