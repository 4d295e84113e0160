"""The configuration of a training run: :class:`TrainConfig` (validated on construction), its
allowed values, and reading it from YAML files and checkpoints."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from eigensam.hessian.closures import AUTO, AUTO_HESSIAN_PARTS
from eigensam.hessian.estimators import ESTIMATORS
from eigensam.hessian.tracker import METHODS as EIG_METHODS
from eigensam.hessian.tracker import SCHEDULES as EIG_SCHEDULES
from eigensam.hessian.tracker import TRACKER_BACKENDS
from eigensam.lab.workloads.datasets import DATASETS, SYNTHETIC
from eigensam.lab.workloads.models import MODELS
from eigensam.optim.fsdp2 import check_fsdp2_options
from eigensam.optim.sam import SHARPNESS

METHODS = ("sgd", "sam", "asam", "eigen-sam", "x-sam", "reverse-sam", "egr")
# Every method of OptimizerSettings: the engine's, and AdamW alone (the LM experiment).
OPTIMIZER_METHODS = (*METHODS, "adamw")
BASE_OPTIMIZERS = ("sgd", "adamw")
DEFAULT_ALPHA = {"eigen-sam": 0.2, "x-sam": 1.0}
LR_SCHEDULES = ("cosine", "constant")
INITS = ("default", "kaiming")
HESSIAN_MODES = ("train", "eval")
STRATEGIES = ("ddp", "fsdp")
# Methods whose optimizer computes Hessian-vector products (backend ``hvp``).
HVP_METHODS = ("eigen-sam", "x-sam", "egr")
# Fields that may differ between a run and its resumption: they do not change the result.
RESUME_FREE_FIELDS = ("out_dir", "data_dir", "download")


def _opt(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class OptimizerSettings:
    """A run's optimizer: the method, the base optimizer it wraps and their hyperparameters;
    validated on construction (``ValueError``/``TypeError`` naming the field, its value and what
    is allowed) and built by :func:`~eigensam.lab.engine.optimizers.build_optimizer`. Methods
    ``sgd`` and ``adamw`` are the base optimizer alone (``base`` must then be that optimizer);
    ``momentum`` and ``nesterov`` apply to SGD. Defaults are the engine's (the paper's recipe).
    """

    method: str = "sgd"
    base: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-5
    nesterov: bool = False
    rho: float = 0.05
    alpha: float | str | None = None
    target_align: float = 0.0
    eta: float = 0.01
    eig_interval: int = 100
    eig_iters: int = 5
    eig_method: str = "power"
    eig_schedule: str = "burst"
    eig_estimator: str = "power"
    hvp: str = AUTO
    hessian_mode: str = "eval"
    hessian_parts: int | str = AUTO
    sharpness: str = "global"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("method", self.method, OPTIMIZER_METHODS)
        _check_choice("base", self.base, BASE_OPTIMIZERS)
        if self.method in BASE_OPTIMIZERS and self.method != self.base:
            raise ValueError(
                f"method {self.method} is the base optimizer alone, but base is {self.base}"
            )
        _check_real("lr", self.lr, 0, low_open=True)
        _check_real("momentum", self.momentum, 0, 1, high_open=True)
        _check_real("weight_decay", self.weight_decay, 0)
        _check_bool("nesterov", self.nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0, got momentum=0")
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
        _check_choice("eig_estimator", self.eig_estimator, ESTIMATORS)
        if self.eig_estimator != "power" and (self.eig_method, self.eig_schedule) != (
            "power",
            "burst",
        ):
            raise ValueError(
                f"eig_estimator {self.eig_estimator} names the rule; eig_method and eig_schedule "
                "describe the paper's family and must stay power and burst with it"
            )
        _check_choice("hvp", self.hvp, TRACKER_BACKENDS)
        _check_choice("hessian_mode", self.hessian_mode, HESSIAN_MODES)
        if self.hessian_parts != AUTO:
            _check_int("hessian_parts", self.hessian_parts, 1, or_auto=True)
        _check_choice("sharpness", self.sharpness, SHARPNESS)
        if self.sharpness == "local" and self.method in (*BASE_OPTIMIZERS, "egr"):
            raise ValueError(
                f"sharpness='local' needs an ascent step; method {self.method} has none"
            )
        _check_int("seed", self.seed, 0)

    @property
    def resolved_alpha(self) -> float | str:
        """``alpha`` ('auto' or a number), or the method's default when it is None (0 for
        methods without alpha)."""
        if self.alpha is None:
            return DEFAULT_ALPHA.get(self.method, 0.0)
        return AUTO if self.alpha == AUTO else float(self.alpha)

    def check_fsdp2(self) -> None:
        """The library's refusals (:func:`~eigensam.optim.fsdp2.check_fsdp2_options`) for
        this optimizer's options on FSDP2's sharded parameters."""
        check_fsdp2_options(
            sharpness=self.sharpness, hvp=self.hvp if self.method in HVP_METHODS else None
        )


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
    data_seed: int = _opt(
        0, "seed of the subset, validation split and label noise (shared by all seeds)"
    )
    label_noise: float = _opt(
        0.0, "fraction of the training labels flipped to another class, in [0, 1)"
    )
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
    eig_estimator: str = _opt(
        "power",
        "Eigen-SAM/X-SAM: the rule that keeps the eigenvector estimate (eigensam.hessian."
        f"estimators; the paper's 'power' by default in the lab): one of {', '.join(ESTIMATORS)}",
    )
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
    track_hvp: str = _opt(
        "auto",
        f"tracking's Hessian-vector products: one of {', '.join(TRACKER_BACKENDS)} "
        "(auto: exact, finite differences with strategy fsdp)",
    )
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
        _check_real("label_noise", self.label_noise, 0, 1, high_open=True)
        _check_bool("augment", self.augment)
        _check_choice("model", self.model, tuple(MODELS))
        _check_real("width", self.width, 0, low_open=True)
        _check_choice("init", self.init, INITS)
        _check_choice("method", self.method, METHODS)
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_real("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        settings = self.optimizer  # validates the optimizer's fields
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_int("track_every", self.track_every, 0)
        _check_int("track_iters", self.track_iters, 1)
        _check_real("track_tol", self.track_tol, 0, low_open=True)
        _check_int("track_batches", self.track_batches, 0)
        _check_choice("track_hvp", self.track_hvp, TRACKER_BACKENDS)
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
            self._check_fsdp(settings)

    def _check_fsdp(self, settings: OptimizerSettings) -> None:
        """What ``strategy: fsdp`` cannot run: the library's FSDP2 refusals
        (:mod:`eigensam.optim.fsdp2`) for the optimizer's options
        (:meth:`OptimizerSettings.check_fsdp2`) and for sharpness tracking's products."""
        try:
            settings.check_fsdp2()
        except ValueError as error:
            raise ValueError(f"strategy fsdp: {error}") from None
        if self.track_every:
            try:
                check_fsdp2_options(hvp=self.track_hvp)
            except ValueError as error:
                raise ValueError(
                    f"strategy fsdp: track_every {self.track_every} with track_hvp "
                    f"{self.track_hvp}: {error}"
                ) from None

    @property
    def optimizer(self) -> OptimizerSettings:
        """The run's optimizer settings (SGD, wrapped by ``method``)."""
        names = [f.name for f in dataclasses.fields(OptimizerSettings) if f.name != "base"]
        return OptimizerSettings(**{name: getattr(self, name) for name in names})

    @property
    def resolved_alpha(self) -> float | str:
        """:attr:`OptimizerSettings.resolved_alpha` of :attr:`optimizer`."""
        return self.optimizer.resolved_alpha

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
