"""Training and measuring :class:`~eigensam.lab.workloads.gpt.TinyGPT` on the standard library's
bytes with AdamW, SAM(AdamW) or Eigen-SAM(AdamW): validation loss, the top Hessian eigenvalue λ₁ and
Align(ε, v₁) over training, time per step, and the accuracy of the finite-difference
Hessian-vector products (what ``hvp="auto"`` uses on SDPA attention) against the exact product
computed through SDPA's math backend.

One run is :func:`train_lm` on an :class:`LMSettings` (a method and a seed); it returns a JSON-ready
record. Measurements (every ``track_every`` steps and after the last) use fixed windows, the
same for every method and seed: the first ``eval_windows`` validation windows for the loss, and
``batch_size`` training windows drawn with a fixed generator for the curvature.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from eigensam.hessian.eigen import power_iteration, random_unit_vector
from eigensam.hessian.hvp import FD_FALLBACK, HessianOperator
from eigensam.hessian.metrics import abs_cosine, align
from eigensam.lab.engine.config import OptimizerSettings
from eigensam.lab.engine.optimizers import build_optimizer
from eigensam.lab.workloads.gpt import TinyGPT, lm_loss
from eigensam.lab.workloads.text import ByteCorpus, ByteWindows, load_corpus
from eigensam.optim import SAM, take_step

METHODS = ("adamw", "sam", "eigen-sam")
TRACK_SEED = 12345  # the curvature batch's windows, the same for every run
ADAMW = OptimizerSettings(
    method="adamw", base="adamw", lr=1e-3, weight_decay=0.01, alpha=0.2, eig_interval=10
)


@dataclass(frozen=True)
class LMSettings:
    """One language-model training setup (model, data, optimizer, measurements)."""

    context: int = 64
    width: int = 128
    layers: int = 4
    heads: int = 4
    batch_size: int = 16
    steps: int = 150
    warmup: int = 10
    # AdamW (lr, weight decay); SAM's and Eigen-SAM's ρ, α, p, q; the method is train_lm's.
    optimizer: OptimizerSettings = ADAMW
    track_every: int = 25
    track_iters: int = 10
    eval_windows: int = 128
    train_bytes: int | None = 2_000_000
    valid_bytes: int | None = 262_144
    valid_fraction: float = 0.1

    def passes(self, method: str) -> int:
        """Forward-backward passes of one run (training, Eigen-SAM's refreshes at 2 gradients
        per central-difference product, curvature tracking), for planning its time."""
        check_method(method)
        train = self.steps * (1 if method == "adamw" else 2)
        if method == "eigen-sam":
            o = self.optimizer
            train += math.ceil(self.steps / o.eig_interval) * o.eig_iters * 2
        tracks = self.steps // self.track_every + 1
        return train + tracks * (2 * self.track_iters + 1)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return method


def build_model(settings: LMSettings, seed: int) -> TinyGPT:
    torch.manual_seed(seed)
    s = settings
    return TinyGPT(context=s.context, width=s.width, layers=s.layers, heads=s.heads)


def lm_optimizer(method: str, model: nn.Module, settings: LMSettings) -> Optimizer:
    """AdamW, or SAM/Eigen-SAM around AdamW (Eigen-SAM with its default ``hvp="auto"``), built
    from ``settings.optimizer`` for ``method``."""
    return build_optimizer(replace(settings.optimizer, method=check_method(method)), model)


def warmup_cosine(settings: LMSettings) -> Any:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fixed_batch(windows: ByteWindows, size: int, seed: int) -> tuple[Tensor, Tensor]:
    order = torch.randperm(len(windows), generator=_generator(seed))
    pairs = [windows[int(i)] for i in order[:size]]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def loss_closure(model: nn.Module, x: Tensor, y: Tensor) -> Any:
    def closure() -> Tensor:
        loss = lm_loss(model(x), y)
        loss.backward()
        return loss

    return closure


@torch.no_grad()
def validation_loss(model: nn.Module, windows: ByteWindows, count: int, batch: int) -> float:
    """Mean next-byte cross-entropy (nats/byte) over the first ``count`` windows, eval mode."""
    was_training = model.training
    model.eval()
    total, n = 0.0, min(count, len(windows))
    for start in range(0, n, batch):
        pairs = [windows[i] for i in range(start, min(n, start + batch))]
        x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        total += float(lm_loss(model(x), y)) * len(pairs)
    model.train(was_training)
    return total / n


def curvature(
    model: nn.Module,
    optimizer: Optimizer,
    batch: tuple[Tensor, Tensor],
    iters: int,
    start: Tensor | None,
    seed: int,
) -> dict[str, Any]:
    """λ₁ (signed Rayleigh quotient of ``iters`` warm-started power steps with the products
    ``hvp="auto"`` uses here, central differences) of the loss on ``batch`` in eval mode, and
    Align(ε, v₁) of the perturbation ``ε`` the optimizer would apply for this batch's gradient
    (for AdamW: ``ε ∝ g``, the direction SAM would take), and ``|cos(g, v₁)|``."""
    params = [p for p in model.parameters() if p.requires_grad]
    closure = loss_closure(model, *batch)
    with HessianOperator(closure, params, backend=FD_FALLBACK, model=model, mode="eval") as op:
        v0 = start if start is not None else random_unit_vector(op.dim, generator=_generator(seed))
        result = power_iteration(op.matvec, v0, iters)
        grad = op.gradient()
    eps = optimizer.perturbation(grad) if isinstance(optimizer, SAM) else grad
    return {
        "lambda1": result.eigenvalue,
        "residual": result.residual,
        "align": align(eps, result.eigenvector),
        "abs_cos_grad": abs_cosine(grad, result.eigenvector),
        "vector": result.eigenvector,
    }


def lm_corpus(settings: LMSettings) -> ByteCorpus:
    """The stdlib corpus split with ``valid_fraction``, cut to ``train_bytes`` and
    ``valid_bytes`` (None: all)."""
    s = settings
    caps = [b for b in (s.train_bytes, s.valid_bytes) if b is not None]
    cap = max(caps) if len(caps) == 2 else None
    corpus = load_corpus(valid_fraction=s.valid_fraction, max_bytes=cap)
    corpus.train = corpus.train[: s.train_bytes]
    corpus.validation = corpus.validation[: s.valid_bytes]
    return corpus


def train_lm(
    method: str, seed: int, settings: LMSettings, corpus: ByteCorpus, *, fd_check: bool = False
) -> dict[str, Any]:
    """Train one run and return its record: settings, ``track`` (one entry per measurement:
    step, validation loss, λ₁, Align, |cos(g, v₁)|), ``train_loss`` per step, the mean seconds
    per optimizer step (measurements excluded) and the final validation loss and perplexity;
    with ``fd_check``, ``fd_accuracy`` at initialization and after training (on the
    curvature batch)."""
    s = settings
    model = build_model(s, seed)
    optimizer = lm_optimizer(method, model, s)
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    schedule = LambdaLR(base, warmup_cosine(s))
    train = ByteWindows(corpus.train, s.context)
    valid = ByteWindows(corpus.validation, s.context)
    track_batch = fixed_batch(train, s.batch_size, TRACK_SEED)
    order = _generator(seed)
    track: list[dict[str, Any]] = []
    losses: list[float] = []
    step_seconds = 0.0
    vector: Tensor | None = None

    def measure(step: int) -> None:
        nonlocal vector
        c = curvature(model, optimizer, track_batch, s.track_iters, vector, seed)
        vector = c.pop("vector")
        c.pop("residual")
        val = validation_loss(model, valid, s.eval_windows, s.batch_size)
        track.append({"kind": "lm", "step": step, "val_loss": val, **c})

    checks = {"init": fd_accuracy(model, track_batch, seed=seed)} if fd_check else {}
    model.train()
    for step in range(s.steps):
        if step % s.track_every == 0:
            measure(step)
        index = torch.randint(len(train), (s.batch_size,), generator=order)
        pairs = [train[int(i)] for i in index]
        x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        started = time.perf_counter()
        loss = take_step(optimizer, loss_closure(model, x, y))
        step_seconds += time.perf_counter() - started
        schedule.step()
        losses.append(float(loss))
    measure(s.steps)
    if fd_check:
        checks["end"] = fd_accuracy(model, track_batch, seed=seed)
    final = track[-1]["val_loss"]
    return {
        "method": method,
        "seed": seed,
        "settings": asdict(s),
        "track": track,
        "train_loss": losses,
        "seconds_per_step": step_seconds / s.steps,
        "val_loss": final,
        "perplexity": math.exp(final),
        "fd_accuracy": checks,
    }


def fd_accuracy(
    model: nn.Module, batch: tuple[Tensor, Tensor], vectors: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Relative error ``‖H_fd v − H v‖ / ‖H v‖`` of the finite-difference product that
    ``hvp="auto"`` uses on this model (``FD_FALLBACK`` at its default step, through the default
    SDPA kernel) against the exact double-backward product through SDPA's math backend
    (``sdpa_kernel(SDPBackend.MATH)``), for ``vectors`` random unit vectors and for the top
    eigenvector (20 exact power steps), with the Rayleigh quotients ``vᵀHv`` of both products
    for that eigenvector; the loss on ``batch`` in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    closure = loss_closure(model, *batch)
    dim = sum(p.numel() for p in params)
    directions = [random_unit_vector(dim, generator=_generator(seed + k)) for k in range(vectors)]
    with sdpa_kernel(SDPBackend.MATH):
        with HessianOperator(closure, params, backend="autograd", model=model, mode="eval") as op:
            top = power_iteration(op.matvec, directions[0], 20)
            directions.append(top.eigenvector)
            exact = [op.matvec(v) for v in directions]
    with HessianOperator(closure, params, backend=FD_FALLBACK, model=model, mode="eval") as op:
        approx = [op.matvec(v) for v in directions]
    errors = [float((a - e).norm() / e.norm()) for a, e in zip(approx, exact, strict=True)]
    return {
        "random": errors[:-1],
        "top": errors[-1],
        "lambda1_exact": float(torch.dot(directions[-1], exact[-1])),
        "lambda1_fd": float(torch.dot(directions[-1], approx[-1])),
    }
