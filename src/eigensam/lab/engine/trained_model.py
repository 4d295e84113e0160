"""A trained model back from a run folder or checkpoint, with fixed batches to measure it on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn
from torch.distributed.checkpoint import CheckpointException

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.config import TrainConfig, checkpoint_config
from eigensam.lab.engine.launch import load_sharded_weights
from eigensam.lab.workloads.datasets import DataSplits, load_dataset
from eigensam.lab.workloads.models import build_model

Batch = tuple[Tensor, Tensor]


@dataclass
class TrainedModel:
    """A model restored from a checkpoint, its config, the Eigen-SAM/X-SAM tracker's last
    eigenvector estimate (None for other methods) and the folder the checkpoint lies in."""

    model: nn.Module
    config: TrainConfig
    tracker_vector: Tensor | None
    folder: Path
    step: int


def training_data(config: TrainConfig) -> DataSplits:
    """The data a run of ``config`` trains on: its seeded subset, validation split and (noisy)
    training labels."""
    return load_dataset(
        config.dataset,
        config.data_dir,
        config.train_subset,
        config.val_fraction,
        config.data_seed,
        config.download,
        config.label_noise,
    )


def checkpoint_file(path: Path | str) -> Path:
    """The checkpoint of a run folder, or ``path`` itself if it is a file."""
    path = Path(path)
    file = path / tracking.CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"checkpoint: {path} is neither a checkpoint file nor a run folder holding "
            f"{tracking.CHECKPOINT_FILE}"
        )
    return file


def load_trained(path: Path | str) -> TrainedModel:
    """Rebuild the model of a checkpoint (on the CPU) and load its weights."""
    file = checkpoint_file(path)
    state = tracking.load_checkpoint(file)
    config = checkpoint_config(state, file)
    data = load_dataset(config.dataset, config.data_dir, config.train_subset, 0.0, 0, False)
    model = build_model(
        config.model, data.num_classes, data.in_channels, data.image_size, config.width
    )
    if state.get("sharded"):  # strategy fsdp: the shards every rank wrote, gathered here
        folder = file.parent / state["sharded"]
        try:
            vector = load_sharded_weights(folder, model)
        except (RuntimeError, KeyError, FileNotFoundError, CheckpointException) as error:
            reason = (str(error).splitlines() or [""])[0]
            raise ValueError(
                f"checkpoint {file}: its sharded state {folder} cannot be loaded into the model "
                f"its configuration describes ({type(error).__name__}: {reason})"
            ) from error
        return TrainedModel(model, config, vector, file.parent, state["step"])
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as error:
        reason = (str(error).splitlines() or [""])[0]
        raise ValueError(
            f"checkpoint {file}: its weights do not fit the model its configuration describes "
            f"({type(error).__name__}: {reason})"
        ) from error
    tracker = state["optimizer"].get("tracker") or {}
    return TrainedModel(model, config, tracker.get("vector"), file.parent, state["step"])


def fixed_batches(
    config: TrainConfig, num_samples: int, batch_size: int, offset: int = 0
) -> list[Batch]:
    """``num_samples`` training samples from index ``offset`` (no augmentation, fixed order),
    split into batches of ``batch_size``."""
    for name, value, low in (("data_subset", num_samples, 1), ("batch_size", batch_size, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    train = training_data(config).train
    if offset + num_samples > len(train.labels):
        raise ValueError(
            f"data_subset: {num_samples} samples from index {offset} exceed the "
            f"{len(train.labels)} training samples"
        )
    images = train.images[offset : offset + num_samples]
    labels = train.labels[offset : offset + num_samples]
    return list(zip(images.split(batch_size), labels.split(batch_size), strict=True))
