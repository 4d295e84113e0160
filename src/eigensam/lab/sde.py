"""SAM against its second- and third-order SDEs (paper §3.3, §4, Eq. 1-5, Theorem 4.1, §6.1).

Four processes start from the same weights ``x₀`` and draw mini-batches ``γ`` from the same
seeded stream (common random numbers, which shrink the Monte Carlo noise of the weak error
without changing its expectation):

``sam``  discrete SAM, Eq. 1, run by :class:`eigensam.optim.SAM` over plain SGD (lr ``η``);
``sgd``  discrete SGD, the reference;
``sde2`` the second-order SDE, Eq. 3, with per-batch drift term ``h₂ = ∇f_γ + ρ ∇²f_γ ĝ_γ``;
``sde3`` the third-order SDE, Eq. 4, with ``h₃ = h₂ + (ρ²/2) ∇³f_γ(ĝ_γ, ĝ_γ)``;

where ``ĝ_γ = ∇f_γ/‖∇f_γ‖`` is held fixed (§4.1). Both SDEs are ``dX = −E_γ[h] dt +
√η Cov_γ[h]^{1/2} dW`` (time ``t = kη``), simulated by SVAG (Li, Malladi & Arora, 2021): ``l``
steps of size ``η/l`` per unit ``η`` of time, each with ``h = c₁ h_{γ₁} + c₂ h_{γ₂}`` from two
independent batches, ``c₁,₂ = ½(1 ± √(2l−1))``. Then ``E h = E_γ h`` and ``Cov h = l·Cov_γ h``,
so ``l`` steps add ``η² Cov_γ h`` to the covariance, as the SDE does over time ``η``; the scheme
converges weakly to the SDE as ``l → ∞``, and ``l = 1`` is the discrete algorithm with drift ``h``.

How the simulated diffusion relates to the paper's Σ (Appendix B, with ``Σ^{a,b}`` the covariance
of the a-th and b-th Taylor terms ``∇f_γ``, ``∇²f_γ ĝ_γ``, ``∇³f_γ(ĝ_γ, ĝ_γ)``):

- ``Cov_γ[h₂] = Σ¹¹ + ρ(Σ¹² + Σ¹²ᵀ) + ρ² Σ²²``: Eq. 3's diffusion plus ``ρ² Σ²²``, a term of
  order ρ² that Eq. 3 drops (it is O(η) for Eq. 3's ``ρ = O(η^{1/2})``);
- ``Cov_γ[h₃] = Σ^SAM + (ρ³/2)(Σ²³ + Σ²³ᵀ) + (ρ⁴/4) Σ³³``: Eq. 4's ``Σ^SAM`` plus terms of order
  ρ³ and ρ⁴, inside Theorem 4.1's ``O(η²ρ³)`` moment error.

The drifts are exactly Eq. 3's and Eq. 4's. Metrics (train loss and ``‖∇f‖`` on the training
subset, test loss and accuracy, ``‖w‖``, λ₁ by Lanczos on a fixed training batch) are recorded
every ``track_every`` η-steps; the weak error of a process against discrete SAM is
``|E g(x_k) − E g(X_{kη})|`` per metric ``g``, the expectations being means over seeds.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eigensam.hessian.hvp import Closure, flatten, unflatten
from eigensam.hessian.metrics import align, cosine
from eigensam.hessian.taylor import taylor_terms
from eigensam.lab import tracking
from eigensam.lab.data import DataSplits, TensorData, load_dataset
from eigensam.lab.models import build_model
from eigensam.lab.train import SharpnessProbe, check_device, evaluate, make_closure
from eigensam.optim import SAM

DRIFTS = ("sgd", "sam", "sde2", "sde3")
DISCRETE = ("sam", "sgd")
METHODS = ("sam", "sde2", "sde3", "sgd")
METRICS = ("train_loss", "test_loss", "test_acc", "weight_norm", "grad_norm", "lambda1")
# ρ = c·η^p schedules of the η-scaling study: Theorem 4.1's regime ρ = O(η^(1/3)), Compagnoni et
# al.'s ρ = O(η^(1/2)), and ρ held constant (beyond both: issue 17's open check).
SCALING_POWERS = {"eta^(1/3)": 1 / 3, "eta^(1/2)": 1 / 2, "eta^0": 0.0}
Batch = tuple[Tensor, Tensor]


class DivergedError(FloatingPointError):
    """A simulated trajectory left the finite range; ``records`` holds what was measured."""

    def __init__(self, message: str, records: list[dict[str, Any]]):
        super().__init__(message)
        self.records = records


# --------------------------------------------------------------------------------------------
# Validation


def check_lr(lr: object, name: str = "lr (η)") -> float:
    """``lr`` (the step size η) as a float if it is a finite real > 0."""
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr):
        raise ValueError(f"{name} must be a finite number > 0, got {lr!r}")
    if lr <= 0:
        raise ValueError(f"{name} must be > 0, got {lr}")
    return float(lr)


def check_rho(rho: object) -> float:
    """``rho`` as a float if it is a finite real ≥ 0."""
    if isinstance(rho, bool) or not isinstance(rho, int | float) or not math.isfinite(rho):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    return float(rho)


def check_l(value: object, name: str = "svag_l") -> int:
    """``value`` (SVAG's time-scale factor l) if it is an int ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} (SVAG factor l) must be an integer >= 1, got {value!r}")
    return value


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# The scheme


def svag_coefficients(svag_l: int) -> tuple[float, float]:
    """``c₁,₂ = ½(1 ± √(2l−1))``: ``c₁ + c₂ = 1`` and ``c₁² + c₂² = l``."""
    root = math.sqrt(2 * check_l(svag_l) - 1)
    return 0.5 * (1 + root), 0.5 * (1 - root)


def _unit(grad: Tensor) -> Tensor:
    norm = grad.norm()
    return grad / norm if float(norm) > 0 else torch.zeros_like(grad)


def make_drift(
    kind: str,
    params: Sequence[Tensor],
    closure_of: Callable[[Any], Closure],
    rho: float,
    model: nn.Module | None = None,
) -> Callable[[Any], Tensor]:
    """``batch ↦ h(batch)`` (flat) at the current parameters, for ``kind`` in :data:`DRIFTS`:
    ``"sgd"`` ``∇f_γ``; ``"sam"`` ``∇f_γ(w + ε)`` with ε from :meth:`SAM.perturbation` (Eq. 1);
    ``"sde2"`` ``∇f_γ + ρ∇²f_γ ĝ_γ`` (Eq. 3); ``"sde3"`` ``+ (ρ²/2)∇³f_γ(ĝ_γ, ĝ_γ)`` (Eq. 4).
    ``closure_of(batch)`` is the torch.optim closure of the batch loss."""
    if kind not in DRIFTS:
        raise ValueError(f"drift kind must be one of {DRIFTS}, got {kind!r}")
    rho = check_rho(rho)
    params = list(params)
    sam = SAM(params, torch.optim.SGD, rho=rho, lr=1.0) if kind == "sam" else None

    def gradient(batch: Any) -> Tensor:
        for p in params:
            p.grad = None
        closure_of(batch)()
        grad = flatten([p.grad for p in params], params).detach()
        for p in params:
            p.grad = None
        return grad

    def drift(batch: Any) -> Tensor:
        if kind == "sgd":
            return gradient(batch)
        if sam is not None:
            eps = sam.perturbation(gradient(batch))
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_add_(params, unflatten(eps, params))
            try:
                return gradient(batch)
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(params, saved)
        order = 3 if kind == "sde3" else 2
        terms = taylor_terms(closure_of(batch), params, _unit, model=model, mode=None, order=order)
        h = terms.gradient + rho * terms.hvp
        if terms.third is not None:
            h = h + 0.5 * rho**2 * terms.third
        return h

    return drift


@torch.no_grad()
def svag_step(
    params: Sequence[Tensor],
    drift: Callable[[Any], Tensor],
    batches: tuple[Any, Any | None],
    lr: float,
    svag_l: int,
) -> None:
    """One SVAG step ``x ← x − (η/l)(c₁ h(γ₁) + c₂ h(γ₂))``; with ``l = 1`` (``c₂ = 0``) the
    second batch is not used and the step is ``x ← x − η h(γ₁)``."""
    c1, c2 = svag_coefficients(svag_l)
    with torch.enable_grad():
        h = drift(batches[0])
        if svag_l > 1:
            if batches[1] is None:
                raise ValueError("SVAG with l > 1 needs a second, independent batch")
            h = c1 * h + c2 * drift(batches[1])
    torch._foreach_add_(list(params), unflatten(h, list(params)), alpha=-lr / svag_l)


# --------------------------------------------------------------------------------------------
# One trajectory on a classifier


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
        if method == "sam":
            self.optimizer = SAM(model, torch.optim.SGD, rho=self.rho, lr=self.lr)
        elif method == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=self.lr)
        else:
            self.drift = make_drift(method, self.params, self._closure, self.rho, model)

    def _closure(self, batch: Batch) -> Closure:
        return make_closure(self.model, nn.CrossEntropyLoss(), *batch)

    def step(self) -> None:
        """One η-step: a discrete step, or ``l`` SVAG steps of size ``η/l``."""
        if isinstance(self.optimizer, SAM):
            self.optimizer.step(self._closure(next(self.first)))
        elif self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self._closure(next(self.first))()
            self.optimizer.step()
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


# --------------------------------------------------------------------------------------------
# The study: Figure 2, weak errors, convergence in l, η-scaling, Corollary 4.1.1


@dataclass(frozen=True)
class SDEConfig:
    """A run of ``eigensam sde``; defaults are the CPU-sized version of the paper's Figure 2
    setting (784-unit GeLU MLP, η = 0.01, ρ = 0.2), :meth:`paper` the full-size one."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_subset: int | None = 4096
    test_subset: int | None = 2000
    model: str = "mlp"
    width: float = 1.0
    batch_size: int = 64
    lr: float = 0.01
    rho: float = 0.2
    steps: int = 300
    track_every: int = 30
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    init_seed: int = 0
    svag_l: int = 4
    lambda_iters: int = 20
    track_batch: int = 256
    figure2: bool = True
    corollary: bool = True
    l_values: tuple[int, ...] = ()
    eta_values: tuple[float, ...] = ()
    eta_horizon: float = 1.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_lr(self.lr)
        check_rho(self.rho)
        check_l(self.svag_l)
        for factor in self.l_values:
            check_l(factor, "l_values")
        for eta in self.eta_values:
            check_lr(eta, "eta_values")
        for name in ("batch_size", "steps", "track_every", "track_batch"):
            _check_positive_int(name, getattr(self, name))
        if self.l_values and not self.figure2:
            raise ValueError("l_values needs figure2=True: its SAM runs are the reference")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if isinstance(self.lambda_iters, bool) or not isinstance(self.lambda_iters, int):
            raise ValueError(f"lambda_iters must be an integer >= 0, got {self.lambda_iters!r}")
        if self.lambda_iters < 0:
            raise ValueError(f"lambda_iters must be >= 0, got {self.lambda_iters}")
        if not (math.isfinite(self.eta_horizon) and self.eta_horizon > 0):
            raise ValueError(f"eta_horizon must be a number > 0, got {self.eta_horizon!r}")

    @classmethod
    def paper(cls, **overrides: Any) -> SDEConfig:
        """Full size: all 60k training images, the full test set, batch 128, T = 10 (1000
        steps), 10 seeds, l = 8."""
        full = dict(
            train_subset=None,
            test_subset=None,
            batch_size=128,
            steps=1000,
            track_every=50,
            seeds=tuple(range(10)),
            svag_l=8,
        )
        return cls(**{**full, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load(config: SDEConfig) -> DataSplits:
    data = load_dataset(config.dataset, config.data_dir, config.train_subset)
    if config.test_subset is not None:
        n = min(config.test_subset, len(data.test))
        data.test = TensorData(data.test.images[:n], data.test.labels[:n])
    return data


@dataclass
class _Context:
    config: SDEConfig
    data: DataSplits
    x0: dict[str, Tensor]
    track_batch: Batch
    device: torch.device
    progress: Callable[[str], None]

    def model(self) -> nn.Module:
        data = self.data
        model = build_model(
            self.config.model,
            data.num_classes,
            data.in_channels,
            data.image_size,
            self.config.width,
        ).to(self.device)
        model.load_state_dict(self.x0)
        return model

    def trajectory(
        self,
        method: str,
        seed: int,
        *,
        lr: float,
        rho: float,
        svag_l: int,
        steps: int,
        track: Tracking,
    ) -> list[dict[str, Any]]:
        trajectory = Trajectory(
            method,
            self.model(),
            self.data,
            lr=lr,
            rho=rho,
            svag_l=svag_l,
            batch_size=self.config.batch_size,
            seed=seed,
            track=track,
            track_batch=self.track_batch,
            device=self.device,
        )
        label = f"[{method} seed {seed} η={lr:g} ρ={rho:.3g} l={svag_l}]"
        return trajectory.run(steps, lambda message: self.progress(f"{label} {message}"))


def paired_weak_error(
    reference: Mapping[int, Sequence[Mapping[str, Any]]],
    other: Mapping[int, Sequence[Mapping[str, Any]]],
    metric: str,
) -> dict[str, Any] | None:
    """``max_k |E g(x_k) − E g(X_{kη})|`` for ``g`` = ``metric`` over the tracked steps present
    in every seed of both (expectations: means over the seeds both have), with the 95% CI
    half-width of the per-seed differences at the maximizing step (the Monte Carlo noise
    floor; seeds share their batch stream, so the differences are paired)."""
    seeds = sorted(set(reference) & set(other))
    if not seeds:
        return None

    def values(runs: Mapping[int, Sequence[Mapping[str, Any]]], seed: int) -> dict[int, float]:
        return {r["step"]: r[metric] for r in runs[seed] if r.get(metric) is not None}

    ref = {s: values(reference, s) for s in seeds}
    oth = {s: values(other, s) for s in seeds}
    steps = sorted(set.intersection(*(set(ref[s]) & set(oth[s]) for s in seeds)))
    if not steps:
        return None
    per_step = []
    for k in steps:
        mean, half = tracking.mean_ci([ref[s][k] - oth[s][k] for s in seeds])
        per_step.append((abs(mean), half, k))
    error, half, step = max(per_step, key=lambda item: item[0])
    return {
        "error": error,
        "ci": half,
        "step": step,
        "mean_over_steps": math.fsum(e for e, _, _ in per_step) / len(per_step),
        "seeds": len(seeds),
    }


def weak_error_table(
    runs: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]],
    metrics: Sequence[str] = METRICS,
    reference: str = "sam",
) -> dict[str, dict[str, dict[str, Any] | None]]:
    """``{method: {metric: paired_weak_error(...)}}`` for every method other than
    ``reference``."""
    return {
        method: {m: paired_weak_error(runs[reference], runs[method], m) for m in metrics}
        for method in runs
        if method != reference
    }


def _fmt(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "–"
    ci = entry["ci"]
    return f"{entry['error']:.3g}" + ("" if ci is None else f" (±{ci:.2g})")


def weak_error_markdown(
    errors: Mapping[str, Mapping[str, Mapping[str, Any] | None]], caption: str
) -> str:
    """Markdown table: one row per method, one column per metric."""
    metrics = [m for m in METRICS if any(row.get(m) for row in errors.values())]
    lines = [
        "| process | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for method, row in errors.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(row.get(m)) for m in metrics) + " |")
    return "\n".join(lines) + "\n" + (f"\n{caption}\n" if caption else "")


WEAK_ERROR_CAPTION = (
    "Weak error max_k |E g(x_k) − E g(X_kη)| against discrete SAM (expectations = means over "
    "seeds); in brackets the 95% CI half-width of the paired per-seed differences at that step "
    "(the Monte Carlo noise floor: an error below it is not resolved)."
)


# --------------------------------------------------------------------------------------------
# Plots

COLORS = {"sam": "black", "sde2": "tab:blue", "sde3": "tab:red", "sgd": "tab:gray"}
LABELS = {"sam": "SAM (discrete)", "sde2": "2nd-order SDE", "sde3": "3rd-order SDE", "sgd": "SGD"}
TITLES = {
    "train_loss": "train loss",
    "test_loss": "test loss",
    "test_acc": "test accuracy",
    "weight_norm": "‖w‖",
    "grad_norm": "‖∇f‖",
    "lambda1": "λ₁ (fixed batch)",
}


def _save(fig: Any, path: Path) -> None:
    from eigensam.atomic import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def plot_figure2(
    runs: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]], path: Path, title: str
) -> None:
    """The paper's Figure 2: one panel per metric, each process's seed mean with its 95% band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8), layout="constrained")
    for ax, metric in zip(fig.subplots(2, 3).ravel(), METRICS, strict=True):
        for method, by_seed in runs.items():
            points: dict[int, list[float]] = {}
            for records in by_seed.values():
                for r in records:
                    if r.get(metric) is not None and math.isfinite(r[metric]):
                        points.setdefault(r["step"], []).append(r[metric])
            if not points:
                continue
            steps = sorted(points)
            stats = [tracking.mean_ci(points[k]) for k in steps]
            means = [m for m, _ in stats]
            halves = [h or 0.0 for _, h in stats]
            color = COLORS.get(method)
            ax.plot(steps, means, color=color, label=LABELS.get(method, method))
            ax.fill_between(
                steps,
                [m - h for m, h in zip(means, halves, strict=True)],
                [m + h for m, h in zip(means, halves, strict=True)],
                color=color,
                alpha=0.15,
            )
        tracking.finish_panel(ax, TITLES[metric], "step k (time kη)")
    fig.suptitle(title)
    _save(fig, path)


def plot_corollary(points: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Scatter of cos(∇³f(ĝ, ĝ), ∇λ₁) against Align(ε, v₁), coloured by step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    scatter = ax.scatter(
        [p["align"] for p in points],
        [p["cos_third"] for p in points],
        c=[p["step"] for p in points],
        cmap="viridis",
        s=18,
    )
    fig.colorbar(scatter, ax=ax, label="step")
    ax.set_xlabel("Align(ε, v₁)")
    ax.set_ylabel("cos(∇³f(ĝ, ĝ), ∇λ₁ = ∇³f(v₁, v₁))")
    ax.axhline(0, color="gray", lw=0.5)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize="medium")
    _save(fig, path)


def plot_l_convergence(results: Mapping[str, Any], path: Path) -> None:
    """Weak error against SVAG's ``l``, one panel per metric."""
    from matplotlib.figure import Figure

    errors = results["errors"].values()
    metrics = [m for m in METRICS if any(e[p].get(m) for e in errors for p in ("sde2", "sde3"))]
    columns = math.ceil(len(metrics) / 2)
    fig = Figure(figsize=(4.5 * columns, 7), layout="constrained")
    axes = fig.subplots(2, columns, squeeze=False).ravel()
    ls = results["l_values"]
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes, metrics, strict=False):
        for method in ("sde2", "sde3"):
            entries = [results["errors"][str(n)][method].get(metric) for n in ls]
            xs = [n for n, e in zip(ls, entries, strict=True) if e]
            ys = [e["error"] for e in entries if e]
            yerr = [e["ci"] or 0.0 for e in entries if e]
            ax.errorbar(
                xs, ys, yerr=yerr, marker="o", capsize=3, color=COLORS[method], label=LABELS[method]
            )
        ax.set_xscale("log", base=2)
        ax.set_title(TITLES[metric])
        ax.set_xlabel("SVAG l")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("weak error vs discrete SAM as SVAG's l grows (bars: MC 95% CI)")
    _save(fig, path)


def fit_slope(etas: Sequence[float], errors: Sequence[float]) -> float | None:
    """Least-squares slope of ``log error`` against ``log η`` (None with < 2 positive points)."""
    pairs = [(math.log(e), math.log(v)) for e, v in zip(etas, errors, strict=True) if v > 0]
    if len(pairs) < 2:
        return None
    mx = math.fsum(x for x, _ in pairs) / len(pairs)
    my = math.fsum(y for _, y in pairs) / len(pairs)
    sxx = math.fsum((x - mx) ** 2 for x, _ in pairs)
    return math.fsum((x - mx) * (y - my) for x, y in pairs) / sxx


def plot_eta_scaling(results: Mapping[str, Any], path: Path) -> None:
    """Log-log weak error against η, one row per ρ schedule, one column per metric."""
    from matplotlib.figure import Figure

    schedules = list(results["schedules"])
    metrics = results["metrics"]
    fig = Figure(figsize=(3.8 * len(metrics), 3.4 * len(schedules)), layout="constrained")
    axes = fig.subplots(len(schedules), len(metrics), squeeze=False)
    etas = results["eta_values"]
    for row, schedule in zip(axes, schedules, strict=True):
        block = results["schedules"][schedule]
        for ax, metric in zip(row, metrics, strict=True):
            for method in ("sde2", "sde3"):
                ys = [block["errors"][str(eta)][method][metric] for eta in etas]
                xs = [eta for eta, e in zip(etas, ys, strict=True) if e]
                vals = [e["error"] for e in ys if e]
                slope = block["slopes"][method][metric]
                label = LABELS[method] + ("" if slope is None else f" (slope {slope:.2f})")
                ax.plot(xs, vals, marker="o", color=COLORS[method], label=label)
                ax.plot(
                    xs,
                    [e["ci"] or float("nan") for e in ys if e],
                    ls=":",
                    color=COLORS[method],
                    alpha=0.6,
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{TITLES[metric]}, ρ = {block['c']:.3g}·{schedule}", fontsize="small")
            ax.set_xlabel("η")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize="x-small")
    fig.suptitle("weak error vs η at fixed horizon (dotted: MC 95% CI half-width)")
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# Running the study

RESULTS_FILE = "sde.json"
CACHE_FILE = "trajectories.json"
FIGURE_FILE = "figure2.png"
TABLE_FILE = "weak_errors.md"
COROLLARY_FILE = "corollary.png"
L_FILES = ("l_convergence.md", "l_convergence.png")
ETA_FILES = ("eta_scaling.md", "eta_scaling.png")
Runs = dict[str, dict[int, list[dict[str, Any]]]]


def _correlation(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    if len(xs) < 3:
        return None
    mx, my = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    syy = math.fsum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def corollary_summary(sam_runs: Mapping[int, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """The Corollary 4.1.1 points recorded during discrete SAM, and their statistics."""
    points = [
        {"seed": seed, "step": r["step"], "align": r["align"], "cos_third": r["cos_third"]}
        for seed, records in sam_runs.items()
        for r in records
        if r.get("cos_third") is not None and r.get("align") is not None
    ]
    aligns = [p["align"] for p in points]
    cosines = [p["cos_third"] for p in points]
    return {
        "points": points,
        "mean_align": math.fsum(aligns) / len(aligns) if aligns else None,
        "mean_cos_third": math.fsum(cosines) / len(cosines) if cosines else None,
        "correlation": _correlation(aligns, cosines),
    }


# Configuration fields every trajectory depends on; the cache is valid while they match.
SHARED_FIELDS = (
    "dataset",
    "train_subset",
    "test_subset",
    "model",
    "width",
    "batch_size",
    "init_seed",
    "track_batch",
    "device",
)


def trajectory_key(
    method: str, seed: int, *, lr: float, rho: float, svag_l: int, steps: int, track: Tracking
) -> str:
    """What determines one trajectory besides :data:`SHARED_FIELDS` (l only for the SDEs)."""
    scheme = f"|l={svag_l}" if method not in DISCRETE else ""
    return (
        f"{method}|seed={seed}|lr={lr!r}|rho={rho!r}{scheme}|steps={steps}|every={track.every}"
        f"|lambda_iters={track.lambda_iters}|corollary={track.corollary and method == 'sam'}"
    )


class _Study:
    """Results, saved after every trajectory, and the cache of finished trajectories
    (``trajectories.json``): a rerun in the same folder reuses those with the same key."""

    def __init__(self, config: SDEConfig, out: Path, progress: Callable[[str], None]):
        self.config, self.out, self.progress = config, out, progress
        self.results: dict[str, Any] = {"config": config.to_dict(), "complete": False}
        self.started = time.perf_counter()
        shared = {name: getattr(config, name) for name in SHARED_FIELDS}
        self.cache: dict[str, Any] = {"shared": shared, "trajectories": {}}
        path = out / CACHE_FILE
        if path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("shared") == json.loads(json.dumps(shared)):
                self.cache["trajectories"] = saved["trajectories"]

    def save(self) -> None:
        self.results["wall_seconds"] = time.perf_counter() - self.started
        tracking.write_json(self.out / RESULTS_FILE, self.results)

    def collect(
        self, runs: Runs, methods: Sequence[str], ctx: _Context, lr: float, rho: float, **kw: Any
    ) -> None:
        """Run every method for every seed into ``runs`` (which ``results`` shares), saving
        after each; on divergence keep and save the partial records before stopping."""
        for seed in self.config.seeds:
            for method in methods:
                key = trajectory_key(method, seed, lr=lr, rho=rho, **kw)
                if key in self.cache["trajectories"]:
                    self.progress(f"[{key}] reused from {CACHE_FILE}")
                    runs.setdefault(method, {})[seed] = self.cache["trajectories"][key]
                    continue
                try:
                    records = ctx.trajectory(method, seed, lr=lr, rho=rho, **kw)
                except DivergedError as error:
                    runs.setdefault(method, {})[seed] = error.records
                    self.results["stopped"] = str(error)
                    self.save()
                    raise
                runs.setdefault(method, {})[seed] = records
                self.cache["trajectories"][key] = records
                tracking.write_json(self.out / CACHE_FILE, self.cache)
                self.save()


def _context(config: SDEConfig, progress: Callable[[str], None]) -> _Context:
    device = check_device(config.device)
    data = _load(config)
    torch.manual_seed(config.init_seed)
    model = build_model(
        config.model, data.num_classes, data.in_channels, data.image_size, config.width
    )
    x0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n = min(config.track_batch, len(data.train))
    track_batch = (data.train.images[:n].to(device), data.train.labels[:n].to(device))
    return _Context(config, data, x0, track_batch, device, progress)


def _figure2(study: _Study, ctx: _Context) -> Runs:
    config = study.config
    runs: Runs = {}
    study.results["runs"] = runs
    track = Tracking(config.track_every, config.lambda_iters, config.corollary)
    study.collect(
        runs,
        METHODS,
        ctx,
        config.lr,
        config.rho,
        svag_l=config.svag_l,
        steps=config.steps,
        track=track,
    )
    errors = weak_error_table(runs)
    study.results["weak_errors"] = errors
    caption = (
        f"{WEAK_ERROR_CAPTION} {len(config.seeds)} seeds, η = {config.lr}, ρ = {config.rho}, "
        f"SVAG l = {config.svag_l}, {config.steps} steps, metrics every {config.track_every}."
    )
    tracking.write_text(study.out / TABLE_FILE, weak_error_markdown(errors, caption))
    plot_figure2(
        runs,
        study.out / FIGURE_FILE,
        f"SAM vs its SDEs: {config.model} on {config.dataset}, η = {config.lr}, "
        f"ρ = {config.rho}, l = {config.svag_l}, {len(config.seeds)} seeds (95% bands)",
    )
    if config.corollary and config.lambda_iters > 0:
        summary = corollary_summary(runs["sam"])
        study.results["corollary"] = summary
        plot_corollary(
            summary["points"],
            study.out / COROLLARY_FILE,
            f"Corollary 4.1.1 during SAM (ρ = {config.rho}): correlation "
            + ("–" if summary["correlation"] is None else f"{summary['correlation']:.2f}"),
        )
    study.save()
    return runs


def _l_convergence(study: _Study, ctx: _Context, base: Runs) -> dict[str, Any]:
    config = study.config
    ls = sorted(set(config.l_values) | {config.svag_l})
    block: dict[str, Any] = {"l_values": ls, "runs": {}, "errors": {}}
    study.results["l_convergence"] = block
    track = Tracking(config.track_every, config.lambda_iters)
    for n in ls:
        runs = block["runs"].setdefault(str(n), {})
        study.collect(
            runs,
            ("sde2", "sde3"),
            ctx,
            config.lr,
            config.rho,
            svag_l=n,
            steps=config.steps,
            track=track,
        )
        block["errors"][str(n)] = weak_error_table({"sam": base["sam"], **runs})
        study.save()
    lines = []
    for n in ls:
        errors = block["errors"][str(n)]
        lines.append(
            f"### l = {n}\n\n" + weak_error_markdown({m: errors[m] for m in ("sde2", "sde3")}, "")
        )
    text = "\n".join(lines) + "\n" + WEAK_ERROR_CAPTION + "\n"
    tracking.write_text(study.out / L_FILES[0], text)
    plot_l_convergence(block, study.out / L_FILES[1])
    return block


SCALING_METRICS = ("train_loss", "test_loss", "weight_norm", "grad_norm")


def _eta_scaling(study: _Study, ctx: _Context) -> dict[str, Any]:
    """For ρ = c·η^p (p = 1/3, 1/2; c such that ρ(config.lr) = config.rho), the weak error of
    each SDE at a fixed horizon for every η, and its fitted log-log slope."""
    config = study.config
    etas = sorted(config.eta_values, reverse=True)
    block: dict[str, Any] = {
        "eta_values": etas,
        "metrics": list(SCALING_METRICS),
        "horizon": config.eta_horizon,
        "schedules": {},
    }
    study.results["eta_scaling"] = block
    for name, power in SCALING_POWERS.items():
        c = config.rho / config.lr**power
        part: dict[str, Any] = {"c": c, "power": power, "runs": {}, "errors": {}, "slopes": {}}
        block["schedules"][name] = part
        for eta in etas:
            steps = max(1, round(config.eta_horizon / eta))
            track = Tracking(max(1, steps // 4), lambda_iters=0)
            runs: Runs = {}
            part["runs"][str(eta)] = runs
            study.collect(
                runs,
                ("sam", "sde2", "sde3"),
                ctx,
                eta,
                c * eta**power,
                svag_l=config.svag_l,
                steps=steps,
                track=track,
            )
            part["errors"][str(eta)] = weak_error_table(runs, SCALING_METRICS)
            study.save()
        for method in ("sde2", "sde3"):
            part["slopes"][method] = {
                metric: fit_slope(
                    etas,
                    [
                        (part["errors"][str(eta)][method][metric] or {"error": 0.0})["error"]
                        for eta in etas
                    ],
                )
                for metric in SCALING_METRICS
            }
    study.save()
    tracking.write_text(study.out / ETA_FILES[0], eta_scaling_markdown(block))
    plot_eta_scaling(block, study.out / ETA_FILES[1])
    return block


def eta_scaling_markdown(block: Mapping[str, Any]) -> str:
    """Per schedule: weak error per η, process and metric, and the fitted slopes."""
    lines = []
    for name, part in block["schedules"].items():
        lines.append(f"### ρ = {part['c']:.3g}·{name}\n")
        header = ["η", "ρ", "process", *block["metrics"]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for eta in block["eta_values"]:
            for method in ("sde2", "sde3"):
                row = part["errors"][str(eta)][method]
                cells = [f"{eta:g}", f"{part['c'] * eta ** part['power']:.3g}", method]
                lines.append(
                    "| " + " | ".join(cells + [_fmt(row[m]) for m in block["metrics"]]) + " |"
                )
        for method in ("sde2", "sde3"):
            slopes = part["slopes"][method]
            cells = ["slope", "", method] + [
                "–" if slopes[m] is None else f"{slopes[m]:.2f}" for m in block["metrics"]
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        f"Horizon T = {block['horizon']} (T/η steps), metrics at 4 evenly spaced times. "
        + WEAK_ERROR_CAPTION
        + " Slope: least squares of log error on log η; Theorem 4.1 predicts ≥ 1 for the "
        "third-order SDE with ρ = O(η^{1/3}) once the error is above the noise floor."
    )
    return "\n".join(lines) + "\n"


def run_sde(
    config: SDEConfig, out_dir: Path | str, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the study ``config`` describes, writing its files to ``out_dir``; return a summary:
    weak errors (Figure 2 setting, unless ``figure2=False``), the Corollary 4.1.1 statistics,
    the l-convergence and η-scaling results when asked for (``l_values``, ``eta_values``),
    files and wall time.

    Files (written atomically, ``sde.json`` after every trajectory): ``sde.json``,
    ``figure2.png``, ``weak_errors.md``, ``corollary.png``, ``l_convergence.{md,png}``,
    ``eta_scaling.{md,png}``. A diverging trajectory raises :class:`DivergedError` after its
    partial records are saved in ``sde.json``.
    """
    if not isinstance(config, SDEConfig):
        raise TypeError(f"config must be an SDEConfig, got {type(config).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda message: None)
    study = _Study(config, out, report)
    ctx = _context(config, report)
    if config.figure2:
        runs = _figure2(study, ctx)
        if config.l_values:
            _l_convergence(study, ctx, runs)
    if config.eta_values:
        _eta_scaling(study, ctx)
    study.results["complete"] = True
    study.save()
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    summary = {
        "out_dir": str(out),
        "wall_seconds": study.results["wall_seconds"],
        "weak_errors": study.results.get("weak_errors", {}),
        "corollary": {k: v for k, v in study.results.get("corollary", {}).items() if k != "points"},
        "files": files,
    }
    for key in ("l_convergence", "eta_scaling"):
        if key in study.results:
            summary[key] = {k: v for k, v in study.results[key].items() if k != "runs"}
    return summary
