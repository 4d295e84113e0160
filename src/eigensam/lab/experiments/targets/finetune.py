"""Table 2's protocol at CPU scale: pretrain, then fine-tune on a different task.

The paper (§6.3) fine-tunes an ImageNet-1K ViT-B-16 on CIFAR-10/100 with learning rate 0.01,
SAM and Eigen-SAM for N steps and SGD for 2N. At CPU scale eigensam pretrains its small ViT on
Fashion-MNIST with SGD (one engine run, cached and shared by every seed), then fine-tunes all
of its weights, with a freshly initialized head, on scikit-learn's 8×8 handwritten digits
(1,797 images, upsampled bilinearly to 28×28 and split into train and test with a fixed seed):
the same recipe, scaled down. scikit-learn is the ``reproduce`` extra; without it the target
stops with one message naming it, before anything trains.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.config import OptimizerSettings
from eigensam.lab.engine.evaluation import evaluate
from eigensam.lab.engine.optimizers import build_optimizer, make_scheduler
from eigensam.lab.engine.train import loss_closure
from eigensam.lab.workloads.datasets import DataSplits, TensorData
from eigensam.optim import take_step

METHODS = ("sgd", "sam", "eigen-sam")
DIGITS_PACKAGE = "sklearn"
DIGITS_INSTALL = "pip install 'eigensam[reproduce]' (or pip install scikit-learn)"
IMAGE_SIZE = 28  # Fashion-MNIST's size, so the pretrained patch embedding fits
TEST_FRACTION = 0.3
SPLIT_SEED = 0


def require_digits() -> None:
    """Raise ``ValueError`` naming scikit-learn when it is not installed (the digits come from
    it): called while planning, before anything trains."""
    if importlib.util.find_spec(DIGITS_PACKAGE) is None:
        raise ValueError(
            "table2 fine-tunes on scikit-learn's 8x8 digits, but the package scikit-learn is "
            f"not installed: {DIGITS_INSTALL}"
        )


def split_digits(
    images: Tensor,
    labels: Tensor,
    *,
    test_fraction: float = TEST_FRACTION,
    seed: int = SPLIT_SEED,
    size: int = IMAGE_SIZE,
) -> DataSplits:
    """Small grey images (N×h×w, any range) and their labels as a fine-tuning task: a seeded
    split into train and test (``round(test_fraction·N)`` test images), bilinear upsampling to
    ``size``×``size``, and normalization by the training images' mean and standard deviation."""
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"images must be N×h×w with N labels, got {tuple(images.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    n = images.shape[0]
    n_test = round(test_fraction * n)
    if not 0 < n_test < n:
        raise ValueError(f"test_fraction={test_fraction} leaves no train or test image of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    x = images.to(torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    train_idx, test_idx = order[n_test:], order[:n_test]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    if not std > 1e-6 * max(1.0, float(mean.abs())):  # up to the rounding of upsampling
        raise ValueError("images: the training images are all equal, nothing to normalize")
    x = (x - mean) / std
    y = labels.to(torch.int64)
    classes = int(y.max()) + 1
    return DataSplits(
        TensorData(x[train_idx], y[train_idx]),
        None,
        TensorData(x[test_idx], y[test_idx]),
        classes,
        1,
        size,
        "digits",
    )


def load_digits() -> DataSplits:
    """scikit-learn's digits (1,797 8×8 images, 10 classes) as :func:`split_digits` gives them."""
    require_digits()
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)
    return split_digits(images, torch.as_tensor(bunch.target, dtype=torch.int64))


# SGD momentum 0.9 from the paper's lr 0.01 (a cosine schedule to 0), no weight decay; ρ and
# Eigen-SAM's α, p, q; whole-batch products.
FINETUNE_SGD = OptimizerSettings(
    lr=0.01, momentum=0.9, weight_decay=0.0, alpha=0.2, eig_interval=20, hessian_parts=1
)


@dataclass(frozen=True)
class Finetune:
    """One fine-tuning run: ``method`` for ``steps`` steps of ``batch_size`` (SGD: twice the
    steps of the sharpness-aware methods, equal gradient evaluations) with the ``optimizer``
    settings (:data:`FINETUNE_SGD`; the method and seed are this run's)."""

    method: str
    seed: int
    steps: int
    batch_size: int = 64
    optimizer: OptimizerSettings = FINETUNE_SGD

    def settings(self) -> OptimizerSettings:
        """The optimizer settings of this run: ``optimizer`` with its method and seed."""
        return replace(self.optimizer, method=self.method, seed=self.seed)


def plan_finetunes(steps: int, seeds: tuple[int, ...] | list[int]) -> dict[str, list[Finetune]]:
    """Every method and seed: SAM and Eigen-SAM for ``steps`` steps, SGD for twice as many
    (the paper's N and 2N)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not seeds:
        raise ValueError("seeds must not be empty")
    return {
        m: [Finetune(m, seed, 2 * steps if m == "sgd" else steps) for seed in seeds]
        for m in METHODS
    }


def new_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """A copy of the pretrained ``model`` whose ``head`` is a freshly initialized linear layer
    with ``num_classes`` outputs (seeded)."""
    tuned = copy.deepcopy(model)
    head = tuned.head
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the pretrained model's head must be nn.Linear, got {type(head).__name__}")
    torch.manual_seed(seed)
    tuned.head = nn.Linear(head.in_features, num_classes)
    return tuned


def finetune(pretrained: nn.Module, data: DataSplits, run: Finetune) -> dict[str, Any]:
    """Fine-tune a copy of ``pretrained`` (new head) on ``data.train`` as ``run`` says, and
    return its train and test loss and accuracy and the CPU seconds it took (this process,
    ``time.process_time``). Batches are drawn from seeded permutations of the training set (one
    per epoch)."""
    cpu0 = time.process_time()
    model = new_head(pretrained, data.num_classes, run.seed)
    model.train()
    optimizer = build_optimizer(run.settings(), model)
    scheduler = make_scheduler("cosine", optimizer, run.steps)
    closure = loss_closure(model, nn.CrossEntropyLoss())
    generator = torch.Generator().manual_seed(run.seed)
    train = data.train
    order: list[int] = []
    for _ in range(run.steps):
        if len(order) < run.batch_size:
            order = torch.randperm(len(train), generator=generator).tolist()
        batch, order = order[: run.batch_size], order[run.batch_size :]
        take_step(optimizer, closure, (train.images[batch], train.labels[batch]))
        scheduler.step()
    device = torch.device("cpu")
    train_loss, train_acc = evaluate(model, train, device)
    test_loss, test_acc = evaluate(model, data.test, device)
    return {
        **asdict(run),
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "cpu_seconds": time.process_time() - cpu0,
    }


def cached_finetune(
    pretrained: nn.Module, data: DataSplits, run: Finetune, folder: Path
) -> dict[str, Any]:
    """:func:`finetune`, cached in ``<folder>/<method>-steps<steps>-seed<seed>.json`` (reused
    when its settings are the same)."""
    path = folder / f"{run.method}-steps{run.steps}-seed{run.seed}.json"
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if all(cached.get(k) == v for k, v in asdict(run).items()):
            return dict(cached)
    result = finetune(pretrained, data, run)
    folder.mkdir(parents=True, exist_ok=True)
    tracking.write_json(path, result)
    return result
