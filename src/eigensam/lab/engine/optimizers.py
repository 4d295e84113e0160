"""The optimizer and learning-rate schedule of a run: :func:`build_optimizer` builds every
:class:`~eigensam.lab.engine.config.OptimizerSettings` (the engine's runs, the LM experiment,
fine-tuning and the SDE study's discrete steps)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from eigensam.lab.engine.config import OptimizerSettings
from eigensam.optim import EGR, SAM, XSAM, EigenSAM, ReverseSAM

BASES: dict[str, type[Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
# The settings Eigen-SAM and X-SAM take by the same name (alpha: resolved_alpha).
TRACKER_OPTIONS = (
    "eig_interval",
    "eig_iters",
    "eig_method",
    "eig_schedule",
    "hvp",
    "hessian_mode",
    "hessian_parts",
    "seed",
)


def build_optimizer(settings: OptimizerSettings, model: nn.Module) -> Optimizer:
    """The base optimizer alone for methods ``sgd``/``adamw``, else the method's wrapper around
    it (given the module, so its BatchNorm statistics are protected; under torchrun the DDP
    wrapper), with the settings' hyperparameters; Eigen-SAM, X-SAM and EGR get ``hvp`` and
    ``hessian_parts`` (their exact products by micro-batches, with ``step(closure, batch=)``)."""
    s = settings
    base_class = BASES[s.base]
    base: dict[str, Any] = dict(lr=s.lr, weight_decay=s.weight_decay)
    if s.base == "sgd":
        base.update(momentum=s.momentum, nesterov=s.nesterov)
    if s.method == s.base:
        return base_class(model.parameters(), **base)
    if s.method == "egr":
        return EGR(model, base_class, s.rho, hvp=s.hvp, hessian_parts=s.hessian_parts, **base)
    base["sharpness"] = s.sharpness
    if s.method == "sam":
        return SAM(model, base_class, s.rho, **base)
    if s.method == "asam":
        return SAM(model, base_class, s.rho, adaptive=True, eta=s.eta, **base)
    if s.method == "reverse-sam":
        return ReverseSAM(model, base_class, s.rho, **base)
    tracked = {name: getattr(s, name) for name in TRACKER_OPTIONS}
    tracked["alpha"] = s.resolved_alpha
    # The lab always names its rule (the paper's by default), except for the paper's variants
    # that eig_method/eig_schedule describe (Lanczos, spread).
    paper_family = (s.eig_method, s.eig_schedule) == ("power", "burst")
    tracked["eig_estimator"] = s.eig_estimator if paper_family else None
    if s.method == "eigen-sam":
        return EigenSAM(model, base_class, s.rho, target_align=s.target_align, **tracked, **base)
    return XSAM(model, base_class, s.rho, **tracked, **base)


def make_scheduler(lr_schedule: str, optimizer: Optimizer, total_steps: int) -> LambdaLR:
    """Per-step schedule: factor ``½(1 + cos(π t / total_steps))`` (``cosine``) or 1
    (``constant``)."""
    if lr_schedule == "constant":
        return LambdaLR(optimizer, lambda step: 1.0)
    return LambdaLR(optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total_steps)))
