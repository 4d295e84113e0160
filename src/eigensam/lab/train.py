"""The training engine: a validated configuration, optimizer factory, loop, tracking and resume.

One run trains ``config.model`` on ``config.dataset`` with SGD (momentum, weight decay) wrapped by
the chosen sharpness-aware method, evaluates every epoch and writes its run folder
(:mod:`eigensam.lab.tracking`). The learning rate follows a cosine schedule *per step*:
``lr_t = lr · ½(1 + cos(π t / T))`` for step ``t`` of ``T = epochs · steps_per_epoch`` (the value
used for step ``t`` is ``lr_t``; the first step uses ``lr``).

Runs are reproducible on CPU from ``seed``: it seeds the model initialization and dropout (the
global torch RNG), the shuffling and augmentation (the batch loader's own generator) and the
Eigen-SAM/X-SAM eigenvector start; ``data_seed`` picks the training subset and validation split,
so that all seeds of a comparison see the same data. A checkpoint stores every RNG state, so a
resumed run reaches the same weights, bit for bit, as an uninterrupted one.

The optimizer's exact Hessian-vector products (Eigen-SAM, X-SAM, EGR with ``hvp="autograd"``)
are summed over ``hessian_parts`` micro-batches of the batch, one part's double-backward graph
alive at a time: the same products (up to rounding) at a fraction of the memory
(:func:`resolve_hessian_parts` gives the number, recorded in the summary); the optimizer's passes
use the whole batch.

Sharpness tracking (``track_every = k > 0``) measures, every ``k`` steps, on the current batch and
*before* the optimizer step, in train mode (the loss being optimized, whatever ``hessian_mode``
the optimizer uses):

- λ₁ of the mini-batch loss by Lanczos (algebraically largest, warm-started from the previous
  measurement, stopped when the relative residual ``‖Hv − λv‖/|λ|`` is at most ``track_tol`` or
  after ``track_iters`` products), with its residual;
- the gradient norm, and Align(ε, v₁) and |cos(ε, v₁)| of the perturbation ε the optimizer
  applies at that step (for SGD and EGR, which apply none, those of the gradient);
- for Eigen-SAM and X-SAM, their own cheap estimate: its eigenvalue and |cos(v̂, v₁)|. When a
  refresh of v̂ is due at that step it is run first on a copy of their tracker (same batch, RNG
  and start: the same result), so ε and v̂ are the ones the step uses.

Every measurement runs inside a :class:`HessianOperator`, which restores the RNG state,
BatchNorm buffers, module modes and gradients, so tracking never changes the trajectory; its
wall time is reported separately from training time. At the end of a tracked run, λ₁ is measured
once more on a fixed batch (the first ``batch_size`` training samples, not augmented), the
``final_lambda1`` of the summary, comparable across methods and seeds.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.distributed.checkpoint import CheckpointException
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from eigensam.hessian.distributed import MeanAcrossRanks, check_same_across_ranks, reshard
from eigensam.hessian.eigen import lanczos, random_unit_vector
from eigensam.hessian.hvp import (
    AUTO,
    AUTO_HESSIAN_PARTS,
    HessianOperator,
    SplitClosure,
    hessian_parts_for,
    split_closure,
)
from eigensam.hessian.metrics import abs_cosine, align
from eigensam.hessian.tracker import METHODS as EIG_METHODS
from eigensam.hessian.tracker import SCHEDULES as EIG_SCHEDULES
from eigensam.hessian.tracker import TRACKER_BACKENDS
from eigensam.lab import distributed, tracking
from eigensam.lab.data import (
    DATASETS,
    SYNTHETIC,
    BatchLoader,
    DataSplits,
    TensorData,
    default_augmentation,
    load_dataset,
)
from eigensam.lab.models import MODELS, build_model, kaiming_init
from eigensam.optim import EGR, SAM, XSAM, EigenSAM, ReverseSAM
from eigensam.optim.sam import SHARPNESS

METHODS = ("sgd", "sam", "asam", "eigen-sam", "x-sam", "reverse-sam", "egr")
DEFAULT_ALPHA = {"eigen-sam": 0.2, "x-sam": 1.0}
LR_SCHEDULES = ("cosine", "constant")
INITS = ("default", "kaiming")
HESSIAN_MODES = ("train", "eval")
STRATEGIES = ("ddp", "fsdp")
# Methods whose optimizer computes Hessian-vector products (backend ``hvp``).
HVP_METHODS = ("eigen-sam", "x-sam", "egr")
EVAL_BATCH_SIZE = 256  # faster than larger batches for the CPU-sized models
# Fields that may differ between a run and its resumption: they do not change the result.
RESUME_FREE_FIELDS = ("out_dir", "data_dir", "download")


def _opt(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; validated on construction (``ValueError`` or
    ``TypeError`` naming the field, its value and what is allowed). Defaults follow the paper's
    recipe (§6.2, Appendix E)."""

    dataset: str = _opt("fashion-mnist", f"one of {', '.join((*DATASETS, SYNTHETIC))}")
    data_dir: str | None = _opt(None, "dataset root (default $EIGENSAM_DATA or ~/.cache)")
    download: bool = _opt(False, "download a missing dataset with torchvision")
    train_subset: int | None = _opt(None, "train on a seeded random subset of this size")
    val_fraction: float = _opt(0.0, "fraction of the training (sub)set held out for validation")
    data_seed: int = _opt(0, "seed of the subset and validation split (shared by all seeds)")
    augment: bool = _opt(True, "random crop (pad 4) and flip as in data.default_augmentation")
    model: str = _opt("simplecnn", f"one of {', '.join(MODELS)}")
    width: float = _opt(1.0, "width multiplier of the model")
    init: str = _opt("default", "weight initialization: default (PyTorch's) or kaiming (He)")
    method: str = _opt("sgd", f"one of {', '.join(METHODS)}")
    epochs: int = _opt(200, "number of epochs")
    batch_size: int = _opt(256, "mini-batch size")
    lr: float = _opt(0.1, "initial learning rate")
    lr_schedule: str = _opt("cosine", "cosine (per step, to 0) or constant")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-5, "SGD weight decay")
    nesterov: bool = _opt(False, "Nesterov momentum")
    label_smoothing: float = _opt(0.0, "label smoothing of the training loss")
    rho: float = _opt(0.05, "perturbation radius (SAM family, EGR coefficient)")
    alpha: float | str | None = _opt(
        None, "Eigen-SAM (default 0.2, or auto) / X-SAM (default 1, in [0, 2])"
    )
    target_align: float = _opt(0.0, "Eigen-SAM alpha=auto: target Align(eps, v) per step")
    eta: float = _opt(0.01, "ASAM: T = |w| + eta")
    eig_interval: int = _opt(100, "Eigen-SAM/X-SAM: eigenvector refresh interval p (steps)")
    eig_iters: int = _opt(5, "Eigen-SAM/X-SAM: Hessian-vector products per refresh q")
    eig_method: str = _opt("power", f"Eigen-SAM/X-SAM solver: one of {', '.join(EIG_METHODS)}")
    eig_schedule: str = _opt("burst", "Eigen-SAM/X-SAM: products all at once (burst) or spread")
    hvp: str = _opt("auto", f"Hessian-vector products: one of {', '.join(TRACKER_BACKENDS)}")
    hessian_mode: str = _opt("eval", "model mode during Eigen-SAM/X-SAM's Hessian products")
    hessian_parts: int | str = _opt(
        AUTO,
        "micro-batches of the optimizer's exact Hessian-vector products (memory); "
        f"auto: {AUTO_HESSIAN_PARTS} when allowed, else 1",
    )
    sharpness: str = _opt("global", "under torchrun: global (averaged) or local (m-sharpness) ε")
    strategy: str = _opt("ddp", "under torchrun: ddp (replicas) or fsdp (FSDP2 shards per block)")
    seed: int = _opt(0, "seed of initialization, shuffling, augmentation, dropout")
    track_every: int = _opt(0, "measure sharpness every k steps (0: off)")
    track_iters: int = _opt(20, "Lanczos budget (Hessian-vector products) per measurement")
    track_tol: float = _opt(1e-3, "Lanczos stops at relative residual ‖Hv − λv‖/|λ| ≤ tol")
    track_batches: int = _opt(0, "also measure on this many fixed unaugmented training batches")
    log_every: int = _opt(10, "log the mean training loss every n steps")
    eval_every: int = _opt(1, "evaluate on the test (and validation) set every n epochs and last")
    device: str = _opt("cpu", "torch device, e.g. cpu, cuda, cuda:1")
    out_dir: str | None = _opt(None, "run folder (default runs/<dataset>-<model>-<method>-seed<s>)")
    checkpoint_every_epochs: int = _opt(1, "checkpoint every n epochs (and at the end)")
    checkpoint_every_steps: int = _opt(0, "also checkpoint every n steps (0: off)")
    snapshot_epochs: list[int] = field(
        default_factory=list,
        metadata={"help": "keep a copy of the checkpoint after these epochs"},
    )

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, (*DATASETS, SYNTHETIC))
        _check_optional_str("data_dir", self.data_dir)
        _check_bool("download", self.download)
        if self.train_subset is not None:
            _check_int("train_subset", self.train_subset, 1)
        _check_real("val_fraction", self.val_fraction, 0, 1, high_open=True)
        _check_int("data_seed", self.data_seed, 0)
        _check_bool("augment", self.augment)
        _check_choice("model", self.model, tuple(MODELS))
        _check_real("width", self.width, 0, low_open=True)
        _check_choice("init", self.init, INITS)
        _check_choice("method", self.method, METHODS)
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_real("lr", self.lr, 0, low_open=True)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_real("momentum", self.momentum, 0, 1, high_open=True)
        _check_real("weight_decay", self.weight_decay, 0)
        _check_bool("nesterov", self.nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0, got momentum=0")
        _check_real("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        _check_real("rho", self.rho, 0)
        if self.alpha == AUTO and self.method != "eigen-sam":
            raise ValueError(f"alpha='auto' is defined for method eigen-sam, got {self.method!r}")
        if self.alpha is not None and self.alpha != AUTO:
            _check_real("alpha", self.alpha, 0)
        _check_real("target_align", self.target_align, 1 - math.sqrt(2), 1, high_open=True)
        if self.method == "x-sam" and not 0 <= float(self.resolved_alpha) <= 2:
            raise ValueError(f"alpha must be in [0, 2] for method x-sam, got {self.alpha}")
        _check_real("eta", self.eta, 0)
        _check_int("eig_interval", self.eig_interval, 1)
        _check_int("eig_iters", self.eig_iters, 1)
        _check_choice("eig_method", self.eig_method, EIG_METHODS)
        _check_choice("eig_schedule", self.eig_schedule, EIG_SCHEDULES)
        if self.eig_schedule == "spread" and self.eig_method != "power":
            raise ValueError(f"eig_schedule spread needs eig_method power, got {self.eig_method!r}")
        _check_choice("hvp", self.hvp, TRACKER_BACKENDS)
        _check_choice("hessian_mode", self.hessian_mode, HESSIAN_MODES)
        if self.hessian_parts != AUTO:
            _check_int("hessian_parts", self.hessian_parts, 1, or_auto=True)
        _check_choice("sharpness", self.sharpness, SHARPNESS)
        if self.sharpness == "local" and self.method in ("sgd", "egr"):
            raise ValueError(
                f"sharpness='local' needs an ascent step; method {self.method} has none"
            )
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_int("seed", self.seed, 0)
        _check_int("track_every", self.track_every, 0)
        _check_int("track_iters", self.track_iters, 1)
        _check_real("track_tol", self.track_tol, 0, low_open=True)
        _check_int("track_batches", self.track_batches, 0)
        _check_int("log_every", self.log_every, 1)
        _check_int("eval_every", self.eval_every, 1)
        _check_optional_str("device", self.device)
        try:
            torch.device(self.device)
        except RuntimeError as error:
            raise ValueError(
                f"device must be a torch device such as 'cpu' or 'cuda:0', got "
                f"{self.device!r} ({error})"
            ) from None
        _check_optional_str("out_dir", self.out_dir)
        _check_int("checkpoint_every_epochs", self.checkpoint_every_epochs, 1)
        _check_int("checkpoint_every_steps", self.checkpoint_every_steps, 0)
        if not isinstance(self.snapshot_epochs, list):
            raise TypeError(
                f"snapshot_epochs must be a list of epochs, got {self.snapshot_epochs!r}"
            )
        for epoch in self.snapshot_epochs:
            _check_int("snapshot_epochs entry", epoch, 1)
        if self.strategy == "fsdp":
            self._check_fsdp()

    def _check_fsdp(self) -> None:
        """What ``strategy: fsdp`` cannot run (FSDP2's sharded parameters have no double
        backward; see :mod:`eigensam.hessian.distributed`)."""
        if self.sharpness == "local":
            raise ValueError(
                "sharpness local is not supported with strategy fsdp (FSDP2 keeps an "
                "unsynchronized gradient unsharded); use sharpness global or strategy ddp"
            )
        if self.method in HVP_METHODS and self.hvp == "autograd":
            raise ValueError(
                "hvp autograd (exact products) is not available with strategy fsdp: double "
                "backward does not reach FSDP2's sharded parameters; use hvp auto, fd-central "
                "or fd-forward"
            )
        if self.method in ("eigen-sam", "x-sam") and self.eig_method != "power":
            raise ValueError(
                f"eig_method {self.eig_method} is not supported with strategy fsdp; use power"
            )
        if self.track_every:
            raise ValueError(
                f"track_every must be 0 with strategy fsdp (sharpness tracking uses exact "
                f"Lanczos products), got {self.track_every}"
            )

    @property
    def resolved_alpha(self) -> float | str:
        """``alpha`` ('auto' or a number), or the method's default when it is None (0 for
        methods without alpha)."""
        if self.alpha is None:
            return DEFAULT_ALPHA.get(self.method, 0.0)
        return AUTO if self.alpha == AUTO else float(self.alpha)

    @property
    def run_dir(self) -> Path:
        """``out_dir``, or ``runs/<dataset>-<model>-<method>-seed<seed>``."""
        if self.out_dir is not None:
            return Path(self.out_dir)
        return Path("runs") / f"{self.dataset}-{self.model}-{self.method}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r}")


def _check_optional_str(name: str, value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r}")


def _check_int(name: str, value: object, low: int, *, or_auto: bool = False) -> None:
    allowed = f"an integer >= {low}" + (f" or {AUTO!r}" if or_auto else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be {allowed}, got {value}")


def _check_real(
    name: str,
    value: object,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    interval = (
        ("(" if low_open else "[")
        + f"{low}, "
        + ("inf)" if high is None else f"{high}" + (")" if high_open else "]"))
    )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number in {interval}, got {value!r}")
    ok = math.isfinite(value) and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be a number in {interval}, got {value}")


# --------------------------------------------------------------------------------------------
# Configuration files


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from a mapping (a YAML file, ``--set`` overrides). Unknown keys are
    refused with the list of valid ones; for number fields, strings that read as numbers are
    accepted (YAML 1.1 reads ``5e-5`` as a string)."""
    if not isinstance(values, Mapping):
        raise TypeError(f"a configuration must be a mapping of field: value, got {values!r}")
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {', '.join(names)}")
    hints = typing.get_type_hints(TrainConfig)
    parsed = {}
    for key, value in values.items():
        if isinstance(value, str) and float in (hints[key], *typing.get_args(hints[key])):
            try:
                value = float(value)
            except ValueError:
                pass  # left as a string: validation reports it with the field's range
        parsed[key] = value
    return TrainConfig(**parsed)


def load_config(path: Path | str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config file; ``overrides`` replace its values before validation."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        reason = getattr(error, "problem", None) or type(error).__name__
        raise ValueError(f"config file {path} is not valid YAML{where}: {reason}") from error
    if not isinstance(values, Mapping):
        raise ValueError(
            f"config file {path}: expected a mapping of field: value, got {type(values).__name__}"
        )
    try:
        return config_from_dict({**values, **(overrides or {})})
    except (ValueError, TypeError) as combined:
        error: Exception = combined
        source = f"config file {path} with the overrides {dict(overrides or {})}"
        try:  # blame the file when it is wrong on its own, else the overrides
            config_from_dict(values)
        except (ValueError, TypeError) as own:
            source, error = f"config file {path}", own
        raise type(error)(f"{source}: {error}") from error


def checkpoint_config(state: Mapping[str, Any], file: Path) -> TrainConfig:
    """The configuration a checkpoint (from :func:`tracking.load_checkpoint`) was written with."""
    try:
        return config_from_dict(state["config"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"checkpoint {file} holds an invalid configuration: {error}") from error


# --------------------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(config: TrainConfig, model: nn.Module) -> Optimizer:
    """``torch.optim.SGD`` for ``sgd``, else the method's wrapper around it (given the module, so
    its BatchNorm statistics are protected; under torchrun the DDP wrapper), with the
    configuration's hyperparameters."""
    base = dict(
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    sgd = torch.optim.SGD
    tracked = dict(
        alpha=config.resolved_alpha,
        eig_interval=config.eig_interval,
        eig_iters=config.eig_iters,
        eig_method=config.eig_method,
        eig_schedule=config.eig_schedule,
        hvp=config.hvp,
        hessian_mode=config.hessian_mode,
        seed=config.seed,
    )
    if config.method == "sgd":
        return sgd(model.parameters(), **base)
    if config.method != "egr":
        base["sharpness"] = config.sharpness
    if config.method == "sam":
        return SAM(model, sgd, config.rho, **base)
    if config.method == "asam":
        return SAM(model, sgd, config.rho, adaptive=True, eta=config.eta, **base)
    if config.method == "eigen-sam":
        return EigenSAM(model, sgd, config.rho, target_align=config.target_align, **tracked, **base)
    if config.method == "x-sam":
        return XSAM(model, sgd, config.rho, **tracked, **base)
    if config.method == "reverse-sam":
        return ReverseSAM(model, sgd, config.rho, **base)
    return EGR(model, sgd, config.rho, hvp=config.hvp, **base)


def make_scheduler(config: TrainConfig, optimizer: Optimizer, total_steps: int) -> LambdaLR:
    """Per-step schedule: factor ``½(1 + cos(π t / total_steps))`` (cosine) or 1 (constant)."""
    if config.lr_schedule == "constant":
        return LambdaLR(optimizer, lambda step: 1.0)
    return LambdaLR(optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total_steps)))


# --------------------------------------------------------------------------------------------
# Sharpness tracking


class SharpnessProbe:
    """λ₁ of a batch loss by Lanczos, and the alignment of the optimizer's perturbation with v₁.

    The Lanczos start is the previous measurement's eigenvector on the same stream of batches
    (warm start): one for the training batches, one per fixed batch; the first start is a random
    unit vector from a private generator seeded with ``seed``. ``reduce`` averages the
    products over the ranks (the global batch's Hessian, see :mod:`eigensam.hessian.distributed`).
    """

    def __init__(
        self, iters: int, tol: float, seed: int, reduce: Callable[[Tensor], Tensor] | None = None
    ):
        self.reduce = reduce
        self.iters = iters
        self.tol = tol
        self.generator = torch.Generator().manual_seed(seed)
        self.vector: Tensor | None = None
        self.fixed_vectors: dict[int, Tensor] = {}

    def top_eigenpair(
        self, closure: Callable[[], Tensor], model: nn.Module, stream: int | None = None
    ) -> tuple[dict[str, Any], Tensor, Tensor]:
        """Record of λ₁, its residual ``‖Hv − λv‖`` (absolute and relative to |λ|), convergence
        and number of products; v₁; and the flat gradient, all in train mode. ``stream`` names
        the fixed batch measured (None: the training batch), whose last v₁ is the warm start."""
        params = list(model.parameters())
        operator = HessianOperator(
            closure, params, backend="autograd", model=model, mode="train", reduce=self.reduce
        )
        with operator as op:
            start = self.vector if stream is None else self.fixed_vectors.get(stream)
            if start is None:
                start = random_unit_vector(op.dim, generator=self.generator, dtype=op.dtype)
            top = lanczos(op.matvec, start.to(op.device), self.iters, k=1, which="LA", tol=self.tol)
            grad = op.gradient()
        pair = top[0]
        if stream is None:
            self.vector = pair.eigenvector.detach().cpu()
        else:
            self.fixed_vectors[stream] = pair.eigenvector.detach().cpu()
        relative = pair.residual / abs(pair.eigenvalue) if pair.eigenvalue != 0 else math.inf
        record = {
            "lambda1": pair.eigenvalue,
            "residual": pair.residual,
            "relative_residual": relative,
            "converged": pair.converged,
            "hvps": pair.num_matvecs,
            "grad_norm": float(grad.norm()),
        }
        return record, pair.eigenvector, grad

    def measure(
        self,
        closure: Callable[[], Tensor],
        model: nn.Module,
        optimizer: Optimizer,
        fixed: Sequence[Callable[[], Tensor]] = (),
    ) -> dict[str, Any]:
        """One tracking record for the step the optimizer is about to take on this batch; with
        ``fixed`` closures (fixed batches), also the mean of λ₁, Align and |cos| over them of
        the perturbation the optimizer would apply on each (``fixed_*`` keys). ``closure`` is
        the one the optimizer gets: a :class:`SplitClosure` is measured on its whole batch and
        its parts serve the preview of the optimizer's refresh."""
        whole = closure.closure if isinstance(closure, SplitClosure) else closure
        record, v1, grad = self.top_eigenpair(whole, model)
        eps, tracker = applied_perturbation(optimizer, grad, closure)
        record["align_of"] = "gradient" if eps is grad else "perturbation"
        nonzero = float(eps.norm()) > 0
        record["align"] = align(eps, v1) if nonzero else None
        record["abs_cos"] = abs_cosine(eps, v1) if nonzero else None
        if tracker is not None:
            vector = tracker.vector
            record["opt_eigenvalue"] = tracker.eigenvalue
            record["opt_vector_cos"] = None if vector is None else abs_cosine(vector, v1)
        if fixed:
            values: dict[str, list[float]] = {"lambda1": [], "align": [], "abs_cos": []}
            for stream, fixed_closure in enumerate(fixed):
                pair, v1, grad = self.top_eigenpair(fixed_closure, model, stream)
                eps = perturbation_with(optimizer, tracker, grad)
                values["lambda1"].append(pair["lambda1"])
                if float(eps.norm()) > 0:
                    values["align"].append(align(eps, v1))
                    values["abs_cos"].append(abs_cosine(eps, v1))
            record.update({f"fixed_{key}": _mean(vals) for key, vals in values.items()})
        return record

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "vector": self.vector,
            "fixed_vectors": dict(self.fixed_vectors),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.vector = state["vector"]
        self.fixed_vectors = dict(state.get("fixed_vectors", {}))


def perturbation_with(optimizer: Optimizer, tracker: Any, grad: Tensor) -> Tensor:
    """The perturbation ε the optimizer applies for ``grad`` when its eigenvector tracker is
    ``tracker`` (``grad`` itself for SGD and EGR, which apply none)."""
    if isinstance(optimizer, EGR) or not isinstance(optimizer, SAM):
        return grad
    if tracker is None:
        return optimizer.perturbation(grad)
    saved = optimizer.tracker
    optimizer.tracker = tracker
    try:
        return optimizer.perturbation(grad)
    finally:
        optimizer.tracker = saved


def applied_perturbation(
    optimizer: Optimizer, grad: Tensor, closure: Callable[[], Tensor]
) -> tuple[Tensor, Any]:
    """The perturbation ε the optimizer applies for gradient ``grad`` on this batch (``grad``
    itself for SGD and EGR, which apply none), and the eigenvector tracker it uses, if any.

    When the optimizer's tracker is due for a refresh at this step (Eigen-SAM's ε depends on v̂),
    the refresh is run on a copy of the tracker (same start vector, batch and RNG: the same
    result) and that copy is returned, so the optimizer itself is not touched.
    """
    if isinstance(optimizer, EGR) or not isinstance(optimizer, SAM):
        return grad, None
    tracker = getattr(optimizer, "tracker", None)
    if tracker is not None and tracker.due(optimizer.sam_steps):
        tracker = copy.deepcopy(tracker)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        tracker.update(closure, params, optimizer.model)
    return perturbation_with(optimizer, tracker, grad), tracker


# --------------------------------------------------------------------------------------------
# The run


def snapshot_file(epoch: int) -> str:
    """File name of the checkpoint kept after ``epoch`` (``snapshot_epochs``)."""
    return f"checkpoint-epoch{epoch}.pt"


def check_device(name: str) -> torch.device:
    """``torch.device(name)`` if a tensor can be allocated there, else a ValueError."""
    device = torch.device(name)
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"device {name!r} is not available here ({error})") from None
    return device


def make_closure(
    model: nn.Module, criterion: nn.Module, images: Tensor, labels: Tensor
) -> Callable[[], Tensor]:
    """The torch.optim closure of one batch: loss, ``backward()``, return the loss."""
    return split_closure(model, criterion, images, labels).closure


def step_closure(
    model: nn.Module, criterion: nn.Module, images: Tensor, labels: Tensor, parts: int
) -> Callable[[], Tensor]:
    """The optimizer's closure of one batch: :func:`make_closure`'s, or with ``parts > 1`` a
    :class:`SplitClosure` whose Hessian-vector products are summed over ``parts`` micro-batches
    (at most one per sample)."""
    parts = min(parts, len(images))
    split = split_closure(model, criterion, images, labels, parts)
    return split if parts > 1 else split.closure


def resolve_hessian_parts(config: TrainConfig, model: nn.Module, batch_size: int) -> int:
    """The number of micro-batches of the optimizer's Hessian-vector products.

    1 when the method computes no exact products (methods outside :data:`HVP_METHODS`, or
    ``hvp`` a finite-difference backend). Else
    :func:`~eigensam.hessian.hvp.hessian_parts_for` of ``hessian_parts`` in the mode of the
    products (``hessian_mode``; always train for EGR, whose products run in the model's train
    mode): ``"auto"`` is :data:`~eigensam.hessian.hvp.AUTO_HESSIAN_PARTS` unless a BatchNorm
    layer is in train mode during them, where it is 1; capped at ``batch_size`` (the
    per-process batch). An explicit number > 1 with BatchNorm in train mode raises
    ``ValueError``: the parts' batch statistics would differ from the batch's.
    """
    if config.method not in HVP_METHODS or config.hvp not in ("autograd", AUTO):
        return 1
    mode = "train" if config.method == "egr" else config.hessian_mode
    try:
        parts = hessian_parts_for(config.hessian_parts, model, mode)
    except ValueError:
        egr = config.method == "egr"
        fix = "hessian_parts=1" if egr else "hessian_mode=eval or hessian_parts=1"
        raise ValueError(
            f"hessian_parts={config.hessian_parts} splits the batch of the Hessian-vector "
            f"products, but model {config.model} has BatchNorm layers in train mode during them "
            f"(their batch statistics would differ per part); use {fix}"
        ) from None
    return min(parts, batch_size)


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


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def check_same_run(
    saved: TrainConfig, given: TrainConfig, where: Path, subject: str | None = None
) -> None:
    """Refuse to continue the run in ``where`` (started with ``saved``) with a configuration that
    differs in a field other than :data:`RESUME_FREE_FIELDS`. ``subject`` replaces "the run in
    ``where`` was started" in the message."""
    changed = [
        f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(given, f.name)!r}"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in RESUME_FREE_FIELDS and getattr(saved, f.name) != getattr(given, f.name)
    ]
    if changed:
        raise ValueError(
            f"{subject or f'the run in {where} was started'} with a different configuration "
            f"({'; '.join(changed)}); resume it with its own configuration or start a new run in "
            "another out_dir"
        )


class Trainer:
    """One training run, prepared on construction (validation, data, model, optimizer, run
    folder, checkpoint restored when resuming) and executed by :meth:`run`.

    ``resume`` is a run folder: the run continues from its last checkpoint (from scratch if it
    has none) and ``config`` must match the one it was started with (``out_dir``, ``data_dir``
    and ``download`` aside). Without ``resume``, the run folder must not hold a run yet.
    ``data`` may pass the already loaded splits of ``config``'s dataset.

    Under ``torchrun`` (or in a process group already initialized) every process runs a Trainer
    with the same configuration (checked: ``ValueError`` naming the fields that differ). The
    model is wrapped in ``DistributedDataParallel``; ``batch_size`` is the global batch, split
    evenly over the ranks by a ``DistributedSampler`` layout of each epoch (so N processes run
    the algorithm of one process, ``sharpness="global"``); the logged training loss is the
    global batch's; evaluation is sharded and summed over the ranks; rank 0 alone writes the run
    folder (logs, checkpoints, summary); a resumed run loads rank 0's checkpoint on every rank.
    With ``strategy="fsdp"`` the model is sharded by FSDP2 instead
    (:func:`~eigensam.lab.distributed.shard_model`), and every rank writes its shards of the model
    and optimizer state with ``torch.distributed.checkpoint`` beside the checkpoint file, which
    names them (:meth:`_save`).
    """

    def __init__(
        self,
        config: TrainConfig,
        resume: Path | str | None = None,
        data: DataSplits | None = None,
    ):
        if resume is not None:
            resume = Path(resume)
            snapshot = resume / tracking.CONFIG_FILE
            if not snapshot.is_file():
                raise FileNotFoundError(f"resume: {resume} holds no run ({snapshot} is missing)")
            config = dataclasses.replace(config, out_dir=str(resume))
            check_same_run(load_config(snapshot), config, resume)
        elif (config.run_dir / tracking.CONFIG_FILE).exists():
            raise ValueError(
                f"out_dir {str(config.run_dir)!r} already holds a run; resume it "
                "(--resume) or choose another out_dir"
            )
        self.config = config
        self.dir = config.run_dir
        self.ranks = distributed.join(config.device)
        device = config.device
        if self.ranks.distributed:
            check_same_across_ranks("the training configuration", config.to_dict())
            if config.batch_size % self.ranks.world_size:
                raise ValueError(
                    f"batch_size {config.batch_size} (the global batch) must be divisible by the "
                    f"number of processes, {self.ranks.world_size}"
                )
            if device == "cuda":
                device = f"cuda:{self.ranks.local_rank}"
        elif config.strategy == "fsdp":
            raise ValueError(
                "strategy fsdp shards the model over the processes of a torchrun job, but this "
                "process runs alone: launch with torchrun --nproc_per_node N (N >= 2) or use "
                "strategy ddp"
            )
        self.sharded = self.ranks.distributed and config.strategy == "fsdp"
        self._sharded_saved: set[str] = set()  # sharded folders this run wrote or loaded
        self.device = check_device(device)
        if data is None:
            data = load_dataset(
                config.dataset,
                config.data_dir,
                config.train_subset,
                config.val_fraction,
                config.data_seed,
                config.download,
            )
        self.data = data
        torch.manual_seed(config.seed)
        self.model = build_model(
            config.model, data.num_classes, data.in_channels, data.image_size, config.width
        )
        if config.init == "kaiming":
            kaiming_init(self.model)
        self.model.to(self.device)
        self.net: nn.Module = self.model  # what the training closure calls
        reduce = None
        if self.sharded:  # FSDP2: self.model itself becomes the sharded module
            self.net = distributed.shard_model(self.model)
        elif self.ranks.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
            reduce = MeanAcrossRanks()
        self.optimizer = make_optimizer(config, self.net)
        augment = default_augmentation(config.dataset) if config.augment else None
        self.loader = BatchLoader(
            data.train,
            config.batch_size // self.ranks.world_size,
            shuffle=True,
            augment=augment,
            generator=torch.Generator().manual_seed(config.seed),
            shard=(self.ranks.rank, self.ranks.world_size),
        )
        self.total_steps = config.epochs * len(self.loader)
        self.scheduler = make_scheduler(config, self.optimizer, self.total_steps)
        # Under FSDP2 the products are finite differences: whole batches.
        self.hessian_parts = (
            1 if self.sharded else resolve_hessian_parts(config, self.model, self.loader.batch_size)
        )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.probe = None
        self.fixed_closures: list[Callable[[], Tensor]] = []
        if config.track_every > 0:
            self.probe = SharpnessProbe(config.track_iters, config.track_tol, config.seed, reduce)
            self.fixed_closures = [
                make_closure(self.model, self.criterion, images, labels)
                for images, labels in self.fixed_batches(config.track_batches)
            ]
        self.step = 0
        self.epoch = 0
        self.checkpoint_step: int | None = None
        self._quiet_bar = False
        self.records: list[tracking.Record] = []
        self.sums = {"epoch_loss": 0.0, "epoch_steps": 0, "window_loss": 0.0, "window_steps": 0}
        self.seconds = {"train": 0.0, "track": 0.0, "eval": 0.0}
        self._clock = time.perf_counter()
        checkpoint = self.dir / tracking.CHECKPOINT_FILE
        if resume is not None and checkpoint.is_file():
            state = tracking.load_checkpoint(checkpoint)
            written = f"checkpoint {checkpoint} was written by a run"
            check_same_run(checkpoint_config(state, checkpoint), config, checkpoint, written)
            self._restore(state, checkpoint)
        elif self.ranks.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            tracking.write_yaml(self.dir / tracking.CONFIG_FILE, config.to_dict())
        if self.ranks.main:
            tracking.write_records(self.dir / tracking.METRICS_FILE, self.records)
        distributed.barrier()

    # -- bookkeeping -------------------------------------------------------------------------

    def _lap(self, bucket: str) -> None:
        """Charge the wall time since the previous lap to ``bucket`` (train, track or eval)."""
        now = time.perf_counter()
        self.seconds[bucket] += now - self._clock
        self._clock = now

    def _log(self, record: tracking.Record) -> None:
        self.records.append(record)
        if self.ranks.main:
            tracking.append_record(self.dir / tracking.METRICS_FILE, record)

    def _mean_over_ranks(self, value: float) -> float:
        return distributed.sum_across_ranks([value])[0] / self.ranks.world_size

    def _evaluate(self, data: TensorData) -> tuple[float, float]:
        """Mean loss and accuracy on ``data``; under torchrun each rank takes a shard."""
        if not self.ranks.distributed:
            return evaluate(self.model, data, self.device)
        distributed.broadcast_buffers(self.model)
        part = distributed.rank_shard(data, self.ranks)
        # FSDP2 gathers weights in every forward pass: all ranks run as many (their shards
        # differ in size by at most one sample).
        largest = -(-len(data) // self.ranks.world_size)
        count = -(-largest // EVAL_BATCH_SIZE) if self.sharded else None
        total_loss, correct = evaluation_sums(self.model, part, self.device, count)
        if self.sharded:
            reshard(self.model)  # forward passes without backward leave the root gathered
        total_loss, correct = distributed.sum_across_ranks([total_loss, correct])
        return total_loss / len(data), correct / len(data)

    def state_dict(self, sharded: str | None = None) -> dict[str, Any]:
        """Everything needed to continue the run bit for bit. Under FSDP2 the model and
        optimizer state are not in it (None) but in the ``sharded`` folder beside the checkpoint
        file that every rank wrote (:meth:`_save`), whose name it keeps."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "config": self.config.to_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "model": None if self.sharded else self.model.state_dict(),
            "optimizer": None if self.sharded else self.optimizer.state_dict(),
            "sharded": sharded,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng,
            "probe": None if self.probe is None else self.probe.state_dict(),
            "sums": dict(self.sums),
            "seconds": dict(self.seconds),
            "records": list(self.records),
        }

    def _restore(self, state: Mapping[str, Any], file: Path) -> None:
        """Load a checkpoint's state; one that does not fit this run raises ``ValueError``
        naming ``file`` (nothing is written before)."""
        try:
            if self.sharded:
                if not state.get("sharded"):
                    raise ValueError("it holds no sharded (strategy fsdp) model state")
                distributed.load_sharded(file.parent / state["sharded"], self.model, self.optimizer)
                self._sharded_saved.add(state["sharded"])
            else:
                if state["model"] is None:
                    raise ValueError("its model state is sharded (strategy fsdp)")
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.loader.load_state_dict(state["loader"])
        except (RuntimeError, ValueError, KeyError, TypeError, CheckpointException) as error:
            reason = (str(error).splitlines() or [""])[0]
            raise ValueError(
                f"checkpoint {file} does not fit this run's model and optimizer "
                f"({type(error).__name__}: {reason})"
            ) from error
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if self.probe is not None:
            self.probe.load_state_dict(state["probe"])
        self.step = self.checkpoint_step = state["step"]
        self.epoch = state["epoch"]
        self.sums = dict(state["sums"])
        self.seconds = dict(state["seconds"])
        self.records = list(state["records"])

    def _checkpoint(self) -> None:
        self._lap("train")
        distributed.broadcast_buffers(self.model)  # rank 0's state is every rank's state
        self._save(self.dir / tracking.CHECKPOINT_FILE)
        self.checkpoint_step = self.step

    def _save(self, file: Path) -> None:
        """Rank 0 writes the checkpoint ``file`` (atomically). Under FSDP2 every rank first
        writes its shards of the model and optimizer state with ``torch.distributed.checkpoint``
        into the folder ``<file stem>-step<step>.dcp`` beside it, which the file names; the
        folder of an earlier step is removed once the file names the new one, so a crash at any
        point leaves a complete checkpoint."""
        folder = file.with_name(f"{file.stem}-step{self.step}.dcp")
        # Written once per step (a step's end-of-epoch checkpoint may follow its step
        # checkpoint); decided from state every rank shares, since the save is collective.
        if self.sharded and folder.name not in self._sharded_saved:
            distributed.save_sharded(folder, self.model, self.optimizer)
            self._sharded_saved.add(folder.name)
        if not self.ranks.main:
            return
        tracking.save_checkpoint(file, self.state_dict(folder.name if self.sharded else None))
        for old in file.parent.glob(f"{file.stem}-step*.dcp"):
            if old != folder:
                shutil.rmtree(old)

    # -- training ------------------------------------------------------------------------------

    def run(self, on_step: Callable[[Trainer], None] | None = None) -> dict[str, Any]:
        """Train to the last epoch, write the summary and return it. ``on_step(trainer)`` is
        called after every step (and its checkpoint). A NaN loss (``FloatingPointError``) or an
        interrupt stops the run with a ``stopped`` record; the last checkpoint stays valid."""
        config = self.config
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"{config.method} seed {config.seed}",
            unit="step",
            disable=not sys.stdout.isatty() or not self.ranks.main,
        )
        self._quiet_bar = bar.disable and self.ranks.main  # rank 0 alone reports progress
        self._clock = time.perf_counter()
        try:
            while self.epoch < config.epochs:
                for images, labels in self.loader:
                    self._train_step(images.to(self.device), labels.to(self.device))
                    bar.update(1)
                    every = config.checkpoint_every_steps
                    if every and self.step % every == 0:
                        self._checkpoint()
                    if on_step is not None:
                        on_step(self)
                self._end_epoch()
                bar.set_postfix(epoch=self.epoch, test_acc=self.records[-1]["test_acc"])
            return self._finish()
        except (KeyboardInterrupt, FloatingPointError) as error:
            self._lap("train")
            stopped = {"kind": "stopped", "step": self.step, "epoch": self.epoch}
            self._log({**stopped, "reason": type(error).__name__, "message": str(error)})
            if isinstance(error, FloatingPointError):
                saved = (
                    "no checkpoint was written yet"
                    if self.checkpoint_step is None
                    else f"the last checkpoint (step {self.checkpoint_step}) is in {self.dir}"
                )
                raise FloatingPointError(
                    f"training stopped at step {self.step}: {error}; {saved}"
                ) from error
            raise
        finally:
            bar.close()

    def _train_step(self, images: Tensor, labels: Tensor) -> None:
        config = self.config
        parts = self.hessian_parts
        closure = step_closure(self.net, self.criterion, images, labels, parts)
        if self.probe is not None and self.step % config.track_every == 0:
            self._lap("train")
            local = step_closure(self.model, self.criterion, images, labels, parts)
            record = self.probe.measure(local, self.model, self.optimizer, self.fixed_closures)
            self._lap("track")
            self._log({"kind": "track", "step": self.step, "epoch": self.epoch, **record})
        lr = self.optimizer.param_groups[0]["lr"]
        if isinstance(self.optimizer, SAM):
            loss = self._mean_over_ranks(float(self.optimizer.step(closure).detach()))
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._mean_over_ranks(float(closure().detach()))
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss}; weights were left unchanged")
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.sums["epoch_loss"] += loss
        self.sums["epoch_steps"] += 1
        self.sums["window_loss"] += loss
        self.sums["window_steps"] += 1
        if self.step % config.log_every == 0:
            mean = self.sums["window_loss"] / self.sums["window_steps"]
            self._log(
                {"kind": "train", "step": self.step, "epoch": self.epoch, "loss": mean, "lr": lr}
            )
            self.sums["window_loss"], self.sums["window_steps"] = 0.0, 0

    def _end_epoch(self) -> None:
        self._lap("train")
        record: tracking.Record = {"kind": "eval", "epoch": self.epoch + 1, "step": self.step}
        steps = self.sums["epoch_steps"]
        record["train_loss"] = self.sums["epoch_loss"] / steps if steps else None
        last = self.epoch + 1 == self.config.epochs
        record["test_loss"] = record["test_acc"] = None
        if last or (self.epoch + 1) % self.config.eval_every == 0:
            record["test_loss"], record["test_acc"] = self._evaluate(self.data.test)
            if self.data.val is not None:
                record["val_loss"], record["val_acc"] = self._evaluate(self.data.val)
        self._lap("eval")
        record.update({f"{k}_seconds": v for k, v in self.seconds.items()})
        self._log(record)
        if self._quiet_bar:  # no progress bar: one line per epoch
            test = "" if record["test_acc"] is None else f", test acc {record['test_acc']:.4f}"
            print(
                f"{self.dir.name}: epoch {self.epoch + 1}/{self.config.epochs}, train loss "
                f"{record['train_loss']:.4f}{test}",
                file=sys.stderr,
                flush=True,
            )
        self.sums["epoch_loss"], self.sums["epoch_steps"] = 0.0, 0
        self.epoch += 1
        if (
            self.epoch % self.config.checkpoint_every_epochs == 0
            or self.epoch == self.config.epochs
            or self.epoch in self.config.snapshot_epochs
        ):
            self._checkpoint()
        if self.epoch in self.config.snapshot_epochs:
            self._save(self.dir / snapshot_file(self.epoch))

    def fixed_batches(self, count: int) -> list[tuple[Tensor, Tensor]]:
        """The first ``count`` batches of ``batch_size`` training samples, not augmented, on
        the run's device (fewer when the training set is smaller)."""
        train, size = self.data.train, self.config.batch_size
        stop = min(count * size, len(train))
        return [
            (train.images[i : i + size].to(self.device), train.labels[i : i + size].to(self.device))
            for i in range(0, stop, size)
        ]

    def final_sharpness(self) -> dict[str, Any]:
        """λ₁ (Lanczos, as in tracking) of the training loss at the current weights on a fixed
        batch: the first ``batch_size`` training samples, not augmented."""
        closure = make_closure(self.model, self.criterion, *self.fixed_batches(1)[0])
        assert self.probe is not None
        record, _, _ = self.probe.top_eigenpair(closure, self.model)
        return record

    def _finish(self) -> dict[str, Any]:
        """Final sharpness (when tracking), then curves, table and ``summary.json``."""
        config = self.config
        final = None
        if self.probe is not None:
            self._lap("train")
            final = self.final_sharpness()
            self._lap("track")
            self._log({"kind": "final_sharpness", "step": self.step, **final})
        last = [r for r in self.records if r["kind"] == "eval"][-1]
        tracks = [r for r in self.records if r["kind"] == "track"]
        steps = max(self.step, 1)
        summary = {
            "status": "finished",
            "run_dir": str(self.dir),
            "method": config.method,
            "seed": config.seed,
            "dataset": config.dataset,
            "model": config.model,
            "epochs": config.epochs,
            "steps": self.step,
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "hessian_parts": self.hessian_parts,
            "train_loss": last["train_loss"],
            "test_loss": last["test_loss"],
            "test_acc": last["test_acc"],
            "val_loss": last.get("val_loss"),
            "val_acc": last.get("val_acc"),
            "final_lambda1": None if final is None else final["lambda1"],
            "final_lambda1_relative_residual": None
            if final is None
            else final["relative_residual"],
            "last_tracked_lambda1": tracks[-1]["lambda1"] if tracks else None,
            "mean_align": _mean([r["align"] for r in tracks if r["align"] is not None]),
            "mean_abs_cos": _mean([r["abs_cos"] for r in tracks if r["abs_cos"] is not None]),
            "mean_fixed_align": _mean(
                [r["fixed_align"] for r in tracks if r.get("fixed_align") is not None]
            ),
            "align_of": tracks[0]["align_of"] if tracks else None,
            "train_seconds": self.seconds["train"],
            "track_seconds": self.seconds["track"],
            "eval_seconds": self.seconds["eval"],
            "train_seconds_per_step": self.seconds["train"] / steps,
        }
        if self.ranks.main:
            title = f"{config.method} on {config.dataset} ({config.model}), seed {config.seed}"
            records = {config.method: [self.records]}
            tracking.plot_curves(records, self.dir / tracking.PLOT_FILE, title)
            table = tracking.summary_table({config.method: [summary]})
            tracking.write_text(self.dir / tracking.TABLE_FILE, f"# {title}\n\n{table}")
            tracking.write_json(self.dir / tracking.SUMMARY_FILE, summary)
        distributed.barrier()  # the other ranks may read the summary (compare) after this
        return summary


def train(
    config: TrainConfig,
    resume: Path | str | None = None,
    *,
    data: DataSplits | None = None,
    on_step: Callable[[Trainer], None] | None = None,
) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) one training run; return its summary
    (see :class:`Trainer`)."""
    return Trainer(config, resume, data).run(on_step)
