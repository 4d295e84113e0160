"""``hessian_parts``: the engine's exact Hessian-vector products by micro-batches (memory-lean),
which the engine hands to the optimizer: the optimizer's resolution rule as the engine's
configurations meet it, validation, equivalence with the whole-batch products and old
configs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_runs import TINY_BN, tiny

from eigensam.hessian.closures import SplitClosure
from eigensam.hessian.hvp import HessianOperator
from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.config import (
    HVP_METHODS,
    METHODS,
    TrainConfig,
    check_same_run,
    config_from_dict,
)
from eigensam.lab.engine.optimizers import build_optimizer
from eigensam.lab.engine.sharpness_probe import SharpnessProbe, applied_perturbation
from eigensam.lab.engine.train import Trainer, loss_closure, train
from eigensam.lab.experiments.runs import check_runs
from eigensam.lab.workloads.datasets import make_synthetic
from eigensam.lab.workloads.models import build_model
from eigensam.optim import EGR, SAM
from eigensam.optim.stepping import step_closure


@pytest.fixture(scope="module")
def cnn() -> torch.nn.Module:
    return build_model("simplecnn", 10, 1, 28, width=0.25)


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    return build_model("resnet18", 10, 1, 28, width=0.0625)


@pytest.fixture
def float64() -> Iterator[None]:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


# --------------------------------------------------------------------------------------------
# Resolution rule


@pytest.mark.parametrize(
    ("fields", "batchnorm", "batch_size", "expected"),
    [
        (dict(method="eigen-sam"), False, 32, 4),
        (dict(method="x-sam"), False, 32, 4),
        (dict(method="egr"), False, 32, 4),
        (dict(method="sgd"), False, 32, 1),
        (dict(method="sam"), False, 32, 1),
        (dict(method="asam"), False, 32, 1),
        (dict(method="reverse-sam"), False, 32, 1),
        (dict(method="sam", hessian_parts=4), False, 32, 1),  # no products to split
        (dict(method="eigen-sam", hvp="fd-forward"), False, 32, 1),
        (dict(method="eigen-sam", hvp="fd-central", hessian_parts=4), False, 32, 1),
        (dict(method="eigen-sam", hessian_mode="train"), True, 32, 1),  # BatchNorm in train mode
        (dict(method="x-sam", hessian_mode="train"), True, 32, 1),
        (dict(method="eigen-sam"), True, 32, 4),  # default: eval mode
        (dict(method="x-sam"), True, 32, 4),
        (dict(method="eigen-sam", hvp="autograd"), True, 32, 4),
        (dict(method="egr", hessian_mode="eval"), True, 32, 1),  # EGR: always train mode
        (dict(method="eigen-sam"), False, 2, 2),  # capped at the batch
        (dict(method="eigen-sam"), False, 1, 1),
        (dict(method="eigen-sam", hessian_parts=1), False, 32, 1),
        (dict(method="eigen-sam", hessian_parts=5), False, 32, 5),
        (dict(method="x-sam", hessian_parts=8, hessian_mode="eval"), True, 32, 8),
        (dict(method="eigen-sam", hessian_parts=64), False, 32, 32),
        (dict(method="eigen-sam", hessian_parts=1), True, 32, 1),
    ],
)
def test_resolution_rule(
    cnn: torch.nn.Module,
    resnet: torch.nn.Module,
    fields: dict[str, Any],
    batchnorm: bool,
    batch_size: int,
    expected: int,
) -> None:
    optimizer = build_optimizer(TrainConfig(**fields).optimizer, resnet if batchnorm else cnn)
    parts = optimizer.split_count(batch_size) if isinstance(optimizer, SAM) else 1
    assert parts == expected


def test_hvp_methods_are_those_whose_optimizer_computes_products(cnn: torch.nn.Module) -> None:
    for method in METHODS:
        optimizer = build_optimizer(TrainConfig(method=method).optimizer, cnn)
        products = hasattr(optimizer, "tracker") or isinstance(optimizer, EGR)
        assert products == (method in HVP_METHODS), method


def test_trainer_resolves_with_the_per_step_batch(tmp_path: Path) -> None:
    assert Trainer(tiny(tmp_path, "a", method="eigen-sam")).hessian_parts == 4
    assert Trainer(tiny(tmp_path, "b", method="sam")).hessian_parts == 1
    assert Trainer(tiny(tmp_path, "c", method="x-sam", batch_size=2)).hessian_parts == 2
    config = TrainConfig(**{**TINY_BN, "method": "eigen-sam", "out_dir": str(tmp_path / "d")})
    assert Trainer(config).hessian_parts == 4  # BatchNorm, default eval-mode products
    assert config.hessian_parts == "auto"  # the config keeps what the user gave
    fields = {**TINY_BN, "method": "eigen-sam", "hessian_mode": "train"}
    assert Trainer(TrainConfig(**fields, out_dir=str(tmp_path / "e"))).hessian_parts == 1


# --------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-1, ValueError), (2.5, TypeError), ("three", TypeError), (True, TypeError)],
)
def test_bad_values_are_refused_naming_the_field(value: object, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        TrainConfig(method="eigen-sam", hessian_parts=value)
    message = str(info.value)
    assert message.startswith("hessian_parts must be an integer >= 1 or 'auto', got ")
    assert str(value) in message


@pytest.mark.parametrize("value", ["auto", 1, 4])
def test_good_values_are_accepted(value: object) -> None:
    assert TrainConfig(hessian_parts=value).hessian_parts == value


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (
            dict(method="eigen-sam", hessian_parts=3, hessian_mode="train"),
            ["hessian_mode='eval'", "hessian_parts=1"],
        ),
        (
            dict(method="x-sam", hessian_parts=2, hessian_mode="train"),
            ["hessian_mode='eval'", "hessian_parts=1"],
        ),
        (dict(method="egr", hessian_parts=2, hessian_mode="eval"), ["use hessian_parts=1"]),
    ],
)
def test_explicit_parts_with_batchnorm_in_train_mode_fail_at_construction(
    tmp_path: Path, fields: dict[str, Any], words: list[str]
) -> None:
    config = TrainConfig(**{**TINY_BN, **fields, "out_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match=r"hessian_parts=\d .*BatchNorm .*train mode") as info:
        Trainer(config)
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "run").exists()  # nothing written


# --------------------------------------------------------------------------------------------
# The step's closure and equivalence with whole-batch products


def test_the_step_splits_only_a_refresh_into_parts(cnn: torch.nn.Module) -> None:
    data = make_synthetic(10, 2)
    batch = (data.train.images, data.train.labels)
    closure = loss_closure(cnn, torch.nn.CrossEntropyLoss())
    fields = dict(method="eigen-sam", eig_interval=2)
    sgd = build_optimizer(TrainConfig(method="sgd").optimizer, cnn)
    assert not isinstance(step_closure(sgd, closure, batch), SplitClosure)
    for parts, expected in ((1, None), (3, 3), (64, 10)):  # at most one part per sample
        opt = build_optimizer(TrainConfig(**fields, hessian_parts=parts).optimizer, cnn)
        split = step_closure(opt, closure, batch)  # step 0: a refresh
        assert (len(split.parts) if isinstance(split, SplitClosure) else None) == expected
        opt.sam_steps = 1  # no refresh: the whole batch
        assert not isinstance(step_closure(opt, closure, batch), SplitClosure)
    losses = [float(c().detach()) for c in (step_closure(sgd, closure, batch), split)]
    assert losses[0] == losses[1]  # the whole-batch loss either way
    cnn.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", ["eigen-sam", "x-sam", "egr"])
def test_parts_give_the_whole_batch_trajectory_in_float64(
    tmp_path: Path, float64: None, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    split_products = []
    split_matvec = HessianOperator._split_matvec

    def counted(self: HessianOperator, v: torch.Tensor) -> torch.Tensor:
        split_products.append(len(self.parts or ()))
        return split_matvec(self, v)

    monkeypatch.setattr(HessianOperator, "_split_matvec", counted)
    states = {}
    for parts in (1, 3):
        config = tiny(
            tmp_path, f"p{parts}", method=method, epochs=1, eig_interval=1, hessian_parts=parts
        )
        summary = train(config)
        assert summary["hessian_parts"] == parts
        # parts=1: the whole-batch closure as before; 3: every product summed over 3 parts.
        assert split_products == ([] if parts == 1 else [3] * (3 if method == "egr" else 15))
        states[parts] = tracking.load_checkpoint(tmp_path / f"p{parts}" / "checkpoint.pt")
    whole, split = states[1], states[3]
    assert whole["step"] == 3
    for key, value in whole["model"].items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(split["model"][key], value, rtol=1e-9, atol=1e-12)
    if method != "egr":
        a, b = whole["optimizer"]["tracker"], split["optimizer"]["tracker"]
        assert a["num_updates"] == b["num_updates"] == 3
        cosine = abs(float(a["vector"] @ b["vector"])) / float(
            a["vector"].norm() * b["vector"].norm()
        )
        assert cosine > 1 - 1e-9
        assert b["eigenvalue"] == pytest.approx(a["eigenvalue"], rel=1e-9)


def test_tracking_leaves_the_split_trajectory_alone(tmp_path: Path) -> None:
    common = dict(
        TINY_BN, method="eigen-sam", hessian_mode="eval", eig_interval=2, epochs=1, track_iters=6
    )
    off = train(TrainConfig(**common, out_dir=str(tmp_path / "off")))
    # Tracking measures λ₁ in train mode on the whole batch (BatchNorm: parts are refused there).
    on = train(TrainConfig(**common, track_every=1, out_dir=str(tmp_path / "on")))
    assert off["hessian_parts"] == on["hessian_parts"] == 4
    a, b = (tracking.load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("off", "on"))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_the_probe_previews_the_refresh_with_the_parts() -> None:
    torch.manual_seed(0)
    data = make_synthetic(32, 8)
    model = build_model("simplecnn", 10, 1, 28, width=0.25)
    opt = build_optimizer(TrainConfig(method="eigen-sam", hessian_parts=3).optimizer, model)
    batch = (data.train.images, data.train.labels)
    closure = step_closure(opt, loss_closure(model, torch.nn.CrossEntropyLoss()), batch)
    assert isinstance(closure, SplitClosure) and len(closure.parts) == 3
    probe = SharpnessProbe(4, 1e-3, seed=0)
    record = probe.measure(closure, model, opt)
    _, _, grad = probe.top_eigenpair(closure.closure, model)
    _, preview = applied_perturbation(opt, grad, closure)
    opt.step(loss_closure(model, torch.nn.CrossEntropyLoss()), batch=batch)
    assert torch.equal(preview.vector, opt.tracker.vector)
    assert record["opt_eigenvalue"] == opt.tracker.eigenvalue


# --------------------------------------------------------------------------------------------
# Configurations written before the field existed


def test_an_old_config_without_the_field_is_the_same_configuration(tmp_path: Path) -> None:
    config = tiny(tmp_path, method="eigen-sam")
    old = {k: v for k, v in config.to_dict().items() if k != "hessian_parts"}
    assert config_from_dict(old) == config
    check_same_run(config_from_dict(old), config, tmp_path)  # resume / reproduce: no change
    config.run_dir.mkdir()
    (config.run_dir / tracking.CONFIG_FILE).write_text(yaml.safe_dump(old), encoding="utf-8")
    assert check_runs([config]) == [config]  # eigensam reproduce / compare reuse the run
    assert Trainer(config, resume=config.run_dir).hessian_parts == 4
    with pytest.raises(ValueError, match=r"hessian_parts: 'auto' -> 1"):
        Trainer(tiny(tmp_path, method="eigen-sam", hessian_parts=1), resume=config.run_dir)
