"""One optimizer-settings type and one builder for the engine, the LM experiment, fine-tuning
and the SDE study."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from eigensam.lab.engine.config import OptimizerSettings, TrainConfig
from eigensam.lab.engine.lm_training import LMSettings
from eigensam.lab.engine.optimizers import build_optimizer
from eigensam.lab.experiments.targets.finetune import Finetune
from eigensam.lab.workloads.models import build_model
from eigensam.optim import SAM, EigenSAM


def test_a_run_configuration_carries_its_optimizer_settings() -> None:
    config = TrainConfig(method="x-sam", lr=0.3, rho=0.1, eig_interval=7, seed=4)
    settings = config.optimizer
    assert (settings.method, settings.base, settings.lr, settings.rho) == ("x-sam", "sgd", 0.3, 0.1)
    assert (settings.eig_interval, settings.seed, settings.resolved_alpha) == (7, 4, 1.0)
    shared = {f.name for f in dataclasses.fields(OptimizerSettings)} - {"base"}
    assert shared <= {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        (dict(method="adamw"), ValueError, "method adamw is the base optimizer alone"),
        (dict(base="adam"), ValueError, "base must be one of sgd, adamw"),
        (dict(lr=0), ValueError, r"lr must be a number in \(0, inf\)"),
        (dict(method="x-sam", alpha=3), ValueError, r"alpha must be in \[0, 2\] for method x-sam"),
        (dict(method="sam", alpha="auto"), ValueError, "alpha='auto' is defined for method eigen"),
        (dict(method="egr", sharpness="local"), ValueError, "needs an ascent step"),
        (dict(hessian_parts=0), ValueError, "hessian_parts must be an integer >= 1"),
        (dict(nesterov=1), TypeError, "nesterov must be true or false"),
    ],
)
def test_settings_are_validated(fields: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        OptimizerSettings(**fields)
    if "base" not in fields and fields.get("method") != "adamw":  # the run configuration too
        with pytest.raises(error, match=match):
            TrainConfig(**fields)


def test_one_builder_serves_the_lm_and_fine_tuning_settings() -> None:
    model = build_model("mlp", 3, 1, 4, width=0.01)
    adamw = build_optimizer(LMSettings().optimizer, model)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["lr"] == 1e-3
    eigen = build_optimizer(dataclasses.replace(LMSettings().optimizer, method="eigen-sam"), model)
    assert isinstance(eigen, EigenSAM) and isinstance(eigen.base_optimizer, torch.optim.AdamW)
    assert (eigen.tracker.interval, eigen.param_groups[0]["alpha"]) == (10, 0.2)
    run = Finetune("sam", seed=3, steps=2)
    sam = build_optimizer(run.settings(), model)
    group = sam.param_groups[0]
    assert type(sam) is SAM and (group["lr"], group["momentum"], group["weight_decay"]) == (
        0.01,
        0.9,
        0.0,
    )
