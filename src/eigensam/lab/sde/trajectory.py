"""One process from ``x₀`` on a classifier: its seeded batch streams, steps and the metrics
recorded along the way.

The four processes (:data:`METHODS`, their drifts in :mod:`eigensam.lab.sde.drifts`) start from
the same weights ``x₀`` and draw mini-batches ``γ`` from the same seeded stream (common random
numbers, which shrink the Monte Carlo noise of the weak error without changing its expectation).
Metrics (train loss and ``‖∇f‖`` on the training subset, test loss and accuracy, ``‖w‖``, λ₁ by
Lanczos on a fixed training batch) are recorded every ``track_every`` η-steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eigensam.hessian.closures import Closure
from eigensam.hessian.hvp import flatten
from eigensam.hessian.metrics import align, cosine
from eigensam.hessian.taylor import taylor_terms
from eigensam.lab.engine.config import OptimizerSettings
from eigensam.lab.engine.evaluation import evaluate
from eigensam.lab.engine.optimizers import build_optimizer
from eigensam.lab.engine.sharpness_probe import SharpnessProbe
from eigensam.lab.engine.train import make_closure
from eigensam.lab.sde.drifts import _unit, check_l, check_lr, check_rho, make_drift, svag_step
from eigensam.lab.workloads.datasets import DataSplits, TensorData
from eigensam.optim import take_step

METHODS = ("sam", "sde2", "sde3", "sgd")
DISCRETE = ("sam", "sgd")  # discrete processes, stepped by the optimizers
METRICS = ("train_loss", "test_loss", "test_acc", "weight_norm", "grad_norm", "lambda1")
Batch = tuple[Tensor, Tensor]


class DivergedError(FloatingPointError):
    """A simulated trajectory left the finite range; ``records`` holds what was measured."""

    def __init__(self, message: str, records: list[dict[str, Any]]):
        super().__init__(message)
        self.records = records


@dataclass(frozen=True)
class Tracking:
    """What is measured every ``every`` η-steps (``lambda_iters = 0``: no λ₁)."""

    every: int
    lambda_iters: int = 20
    corollary: bool = False


class BatchStream:
    """Seeded i.i.d. mini-batches (without replacement inside a batch) of the training set."""

    def __init__(self, data: TensorData, batch_size: int, seed: int, device: torch.device):
        self.data, self.batch_size, self.device = data, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        index = torch.randperm(len(self.data), generator=self.generator)[: self.batch_size]
        return self.data.images[index].to(self.device), self.data.labels[index].to(self.device)


def _full_gradient_norm(model: nn.Module, data: TensorData, device: torch.device) -> float:
    """``‖∇f‖`` of the mean cross-entropy over ``data`` (gradients summed over chunks)."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for start in range(0, len(data), 1024):
        images = data.images[start : start + 1024].to(device)
        labels = data.labels[start : start + 1024].to(device)
        loss = F.cross_entropy(model(images), labels, reduction="sum") / len(data)
        for acc, g in zip(total, torch.autograd.grad(loss, params), strict=True):
            acc += g
    return float(flatten(total, params).norm())


def _nonzero(x: Tensor) -> bool:
    norm = float(x.norm())
    return math.isfinite(norm) and norm > 0


def _corollary_point(
    closure: Closure, model: nn.Module, v1: Tensor, grad: Tensor
) -> dict[str, float | None]:
    """Align(ε, v₁) for SAM's ε ∥ ĝ (paper §4.3) and cos(∇³f(ĝ, ĝ), ∇λ₁ = ∇³f(v₁, v₁));
    None where a vector is zero (no direction)."""
    params = list(model.parameters())
    unit = _unit(grad)
    along_g = taylor_terms(closure, params, unit, model=model, mode="train").third
    along_v = taylor_terms(closure, params, v1.to(grad), model=model, mode="train").third
    assert along_g is not None and along_v is not None
    return {
        "align": align(unit, v1) if _nonzero(unit) else None,
        "cos_third": cosine(along_g, along_v) if _nonzero(along_g) and _nonzero(along_v) else None,
    }


class Trajectory:
    """One process (a :data:`METHODS` entry) from ``x₀`` on ``data``, recording metrics."""

    def __init__(
        self,
        method: str,
        model: nn.Module,
        data: DataSplits,
        *,
        lr: float,
        rho: float,
        svag_l: int,
        batch_size: int,
        seed: int,
        track: Tracking,
        track_batch: Batch,
        device: torch.device,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.model, self.data, self.device = method, model, data, device
        self.lr, self.rho, self.svag_l = check_lr(lr), check_rho(rho), check_l(svag_l)
        self.track, self.track_batch = track, track_batch
        self.params = list(model.parameters())
        self.first = BatchStream(data.train, batch_size, 2 * seed, device)
        self.second = BatchStream(data.train, batch_size, 2 * seed + 1, device)
        self.probe = SharpnessProbe(max(track.lambda_iters, 1), 1e-3, seed)
        self.records: list[dict[str, Any]] = []
        self.optimizer: torch.optim.Optimizer | None = None
        if method in DISCRETE:  # plain SGD steps of size η (SAM: radius ρ)
            settings = OptimizerSettings(
                method=method, lr=self.lr, momentum=0.0, weight_decay=0.0, rho=self.rho
            )
            self.optimizer = build_optimizer(settings, model)
        else:
            self.drift = make_drift(method, self.params, self._closure, self.rho, model)

    def _closure(self, batch: Batch) -> Closure:
        return make_closure(self.model, nn.CrossEntropyLoss(), *batch)

    def step(self) -> None:
        """One η-step: a discrete step, or ``l`` SVAG steps of size ``η/l``."""
        if self.optimizer is not None:
            take_step(self.optimizer, self._closure(next(self.first)))
        else:
            for _ in range(self.svag_l):
                second = next(self.second) if self.svag_l > 1 else None
                batches = (next(self.first), second)
                svag_step(self.params, self.drift, batches, self.lr, self.svag_l)

    def measure(self, step: int) -> dict[str, Any]:
        train_loss, _ = evaluate(self.model, self.data.train, self.device)
        test_loss, test_acc = evaluate(self.model, self.data.test, self.device)
        with torch.no_grad():
            weight_norm = float(flatten(self.params, self.params).norm())
        record: dict[str, Any] = {
            "step": step,
            "time": step * self.lr,
            "train_loss": train_loss,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "weight_norm": weight_norm,
            "grad_norm": _full_gradient_norm(self.model, self.data.train, self.device),
        }
        if self.track.lambda_iters > 0:
            closure = self._closure(self.track_batch)
            try:
                pair, v1, grad = self.probe.top_eigenpair(closure, self.model)
            except FloatingPointError:  # a non-finite Hessian-vector product: diverged
                record["lambda1"] = math.nan
                return record
            record["lambda1"] = pair["lambda1"]
            record["lambda1_residual"] = pair["relative_residual"]
            if self.track.corollary and self.method == "sam":
                record.update(_corollary_point(closure, self.model, v1, grad))
        return record

    def run(self, steps: int, progress: Callable[[str], None] | None = None) -> list[dict]:
        """``steps`` η-steps, measuring at step 0 and every ``track.every``; a non-finite
        metric or loss raises :class:`DivergedError` carrying the records so far."""
        for k in range(steps + 1):
            if k % self.track.every == 0 or k == steps:
                record = self.measure(k)
                self.records.append(record)
                if progress is not None:
                    progress(
                        f"step {k}/{steps}: train loss {record['train_loss']:.4f}"
                        + (f", λ₁ {record['lambda1']:.3f}" if "lambda1" in record else "")
                    )
                bad = [m for m in METRICS if m in record and not math.isfinite(record[m])]
                if bad:
                    raise DivergedError(
                        f"{self.method} diverged at step {k}: {', '.join(bad)} not finite",
                        self.records,
                    )
            if k < steps:
                try:
                    self.step()
                except FloatingPointError as error:
                    raise DivergedError(
                        f"{self.method} diverged at step {k}: {error}", self.records
                    ) from error
        return self.records
