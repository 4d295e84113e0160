"""What the benchmark scripts share."""

from __future__ import annotations

import torch
from torch import Tensor

from eigensam.lab.workloads.datasets import load_dataset


def load_images(count: int) -> tuple[Tensor, Tensor, str]:
    """``count`` Fashion-MNIST training images and labels (random images if it is missing)."""
    try:
        train = load_dataset("fashion-mnist", train_subset=count).train
        return train.images, train.labels, "Fashion-MNIST"
    except FileNotFoundError:
        g = torch.Generator().manual_seed(0)
        images = torch.randn(count, 1, 28, 28, generator=g)
        return images, torch.randint(0, 10, (count,), generator=g), "random images"
