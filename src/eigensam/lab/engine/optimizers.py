"""The optimizer and learning-rate schedule of a training run, built from its
:class:`~eigensam.lab.engine.config.TrainConfig`."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from eigensam.lab.engine.config import TrainConfig
from eigensam.optim import EGR, SAM, XSAM, EigenSAM, ReverseSAM


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
