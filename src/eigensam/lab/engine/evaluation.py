"""Evaluation of a classifier: mean loss and accuracy on a dataset, in eval mode."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eigensam.lab.workloads.datasets import TensorData

EVAL_BATCH_SIZE = 256  # faster than larger batches for the CPU-sized models


def evaluate(model: nn.Module, data: TensorData, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy (without label smoothing) and accuracy of ``model`` in eval mode."""
    total_loss, correct = evaluation_sums(model, data, device)
    return total_loss / len(data), correct / len(data)


@torch.no_grad()
def evaluation_sums(
    model: nn.Module, data: TensorData, device: torch.device, num_batches: int | None = None
) -> tuple[float, int]:
    """Summed cross-entropy and number of correct predictions of ``model`` in eval mode, in
    batches of ``EVAL_BATCH_SIZE``, or in exactly ``num_batches`` near-equal batches (some
    possibly empty: every rank of an FSDP2 model must run as many forward passes)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    if num_batches is None:
        starts = range(0, len(data), EVAL_BATCH_SIZE)
        batches = [
            (data.images[i : i + EVAL_BATCH_SIZE], data.labels[i : i + EVAL_BATCH_SIZE])
            for i in starts
        ]
    else:
        images, labels = data.images, data.labels
        batches = list(
            zip(images.tensor_split(num_batches), labels.tensor_split(num_batches), strict=True)
        )
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    model.train(was_training)
    return total_loss, correct
