"""Tests for the training engine (eigensam.lab.engine.train, config, sharpness_probe):
configuration, runs, tracking, resume and interruption."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_runs import TINY_BN, tiny

from eigensam.hessian.hvp import flatten
from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.config import METHODS, TrainConfig, config_from_dict, load_config
from eigensam.lab.engine.optimizers import build_optimizer
from eigensam.lab.engine.sharpness_probe import SharpnessProbe, applied_perturbation
from eigensam.lab.engine.train import Trainer, make_closure, train
from eigensam.lab.workloads.datasets import make_synthetic
from eigensam.lab.workloads.models import build_model
from eigensam.optim import EGR, SAM, XSAM, EigenSAM, ReverseSAM

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def without_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records]


def final_state(run_dir: Path) -> dict[str, Any]:
    return tracking.load_checkpoint(run_dir / tracking.CHECKPOINT_FILE)


class StopAt:
    """``on_step`` callback raising ``error`` once the run reaches ``step``."""

    def __init__(self, step: int, error: BaseException):
        self.step = step
        self.error = error

    def __call__(self, trainer: Trainer) -> None:
        if trainer.step == self.step:
            raise self.error


# --------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("overrides", "error", "words"),
    [
        ({"method": "adam"}, ValueError, ["method", "'adam'", "sgd, sam, asam, eigen-sam"]),
        ({"dataset": "imagenet"}, ValueError, ["dataset", "fashion-mnist", "synthetic"]),
        ({"model": "vgg"}, ValueError, ["model", "simplecnn", "wrn28-10"]),
        ({"epochs": 0}, ValueError, ["epochs", ">= 1", "0"]),
        ({"epochs": 1.5}, TypeError, ["epochs", "1.5"]),
        ({"batch_size": 0}, ValueError, ["batch_size"]),
        ({"train_subset": 0}, ValueError, ["train_subset"]),
        ({"lr": 0.0}, ValueError, ["lr", "(0"]),
        ({"lr": "fast"}, TypeError, ["lr", "'fast'"]),
        ({"momentum": 1.0}, ValueError, ["momentum", "[0, 1)"]),
        ({"weight_decay": -1e-4}, ValueError, ["weight_decay"]),
        ({"nesterov": True, "momentum": 0.0}, ValueError, ["nesterov", "momentum"]),
        ({"label_smoothing": 1.0}, ValueError, ["label_smoothing"]),
        ({"val_fraction": 1.0}, ValueError, ["val_fraction"]),
        ({"width": 0}, ValueError, ["width"]),
        ({"rho": -0.1}, ValueError, ["rho"]),
        ({"rho": math.nan}, ValueError, ["rho", "nan"]),
        ({"method": "x-sam", "alpha": 2.5}, ValueError, ["alpha", "[0, 2]", "x-sam", "2.5"]),
        ({"method": "eigen-sam", "alpha": -0.2}, ValueError, ["alpha", "-0.2"]),
        ({"eig_interval": 0}, ValueError, ["eig_interval"]),
        ({"eig_method": "qr"}, ValueError, ["eig_method", "power, lanczos"]),
        ({"hvp": "fd"}, ValueError, ["hvp", "autograd, fd-central, fd-forward"]),
        ({"hessian_mode": "test"}, ValueError, ["hessian_mode", "train, eval"]),
        ({"lr_schedule": "step"}, ValueError, ["lr_schedule", "cosine, constant"]),
        ({"track_every": -1}, ValueError, ["track_every"]),
        ({"track_tol": 0.0}, ValueError, ["track_tol"]),
        ({"device": "gpu0"}, ValueError, ["device", "'gpu0'"]),
        ({"augment": "yes"}, TypeError, ["augment", "'yes'"]),
        ({"checkpoint_every_epochs": 0}, ValueError, ["checkpoint_every_epochs"]),
    ],
)
def test_invalid_config_is_refused(
    overrides: dict[str, Any], error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as info:
        TrainConfig(**overrides)
    for word in words:
        assert word in str(info.value)


def test_alpha_defaults_and_is_ignored_by_methods_without_it() -> None:
    assert TrainConfig(method="eigen-sam").resolved_alpha == 0.2
    assert TrainConfig(method="x-sam").resolved_alpha == 1.0
    assert TrainConfig(method="sgd", alpha=5.0).resolved_alpha == 5.0  # accepted, unused
    assert TrainConfig(method="x-sam", alpha=2).resolved_alpha == 2.0


def test_config_from_dict_and_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown config keys \['lr_max'\]; valid keys: .*lr"):
        config_from_dict({"lr_max": 0.1})
    # YAML 1.1 reads 5e-5 as a string; number fields accept it.
    assert config_from_dict({"weight_decay": "5e-5"}).weight_decay == 5e-5
    with pytest.raises(TypeError, match="lr must be a number"):
        config_from_dict({"lr": "fast"})
    path = tmp_path / "c.yaml"
    path.write_text("method: sam\nweight_decay: 5e-5\nepochs: 3\n")
    config = load_config(path, {"epochs": 4})
    assert (config.method, config.weight_decay, config.epochs) == ("sam", 5e-5, 4)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(path)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Fashion-MNIST not installed")
def test_train_subset_larger_than_dataset_is_refused_before_training(tmp_path: Path) -> None:
    config = TrainConfig(dataset="fashion-mnist", train_subset=70_000, out_dir=str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"train_subset must be an integer in \[1, 60000\]"):
        Trainer(config)
    assert not (tmp_path / "r").exists()


def test_build_optimizer_builds_each_method() -> None:
    model = build_model("mlp", 3, 1, 4, width=0.01)
    expected = {
        "sgd": torch.optim.SGD,
        "sam": SAM,
        "asam": SAM,
        "eigen-sam": EigenSAM,
        "x-sam": XSAM,
        "reverse-sam": ReverseSAM,
        "egr": EGR,
    }
    assert set(expected) == set(METHODS)
    for method, cls in expected.items():
        config = TrainConfig(method=method, lr=0.3, weight_decay=1e-3, rho=0.07)
        opt = build_optimizer(config.optimizer, model)
        assert type(opt) is cls
        group = opt.param_groups[0]
        assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.3, 0.9, 1e-3)
        if method != "sgd":
            assert group["rho"] == 0.07 and opt.model is model
            assert group["adaptive"] == (method == "asam")
    eigen = build_optimizer(
        TrainConfig(method="eigen-sam", eig_interval=7, eig_iters=3).optimizer, model
    )
    assert (eigen.tracker.interval, eigen.tracker.iters, eigen.param_groups[0]["alpha"]) == (
        7,
        3,
        0.2,
    )


# --------------------------------------------------------------------------------------------
# A run and its outputs


def test_run_writes_every_output(tmp_path: Path) -> None:
    config = tiny(tmp_path, method="eigen-sam", track_every=2, eig_interval=2, val_fraction=0.25)
    summary = train(config)
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "checkpoint.pt",
        "summary.json",
        "curves.png",
        "summary.md",
    ):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*.tmp"))
    assert load_config(run / "config.yaml") == config
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| eigen-sam | 1 |" in (run / "summary.md").read_text()

    records = tracking.read_records(run / "metrics.jsonl")
    kinds = [r["kind"] for r in records]
    assert kinds.count("train") == 6 and kinds.count("eval") == 2 and kinds.count("track") == 3
    assert kinds[-1] == "final_sharpness"
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all(
        {"test_acc", "test_loss", "val_acc", "val_loss", "train_loss"} <= set(r) for r in evals
    )
    for r in (r for r in records if r["kind"] == "track"):
        assert r["lambda1"] > 0 and r["hvps"] <= 8 and r["grad_norm"] > 0
        assert r["align_of"] == "perturbation"
        assert 1 - math.sqrt(2) <= r["align"] <= 1 and 0 <= r["abs_cos"] <= 1
        assert math.isclose(r["align"], 1 - math.sqrt(2 - 2 * r["abs_cos"]), abs_tol=1e-9)
        assert r["opt_eigenvalue"] is not None and 0 <= r["opt_vector_cos"] <= 1

    state = final_state(run)
    assert state["step"] == 6 and state["epoch"] == 2
    assert state["optimizer"]["tracker"]["vector"] is not None  # the eigenvector estimate
    assert {"model", "scheduler", "loader", "rng", "probe", "records"} <= set(state)
    assert state["records"] == records[:-1]  # all but the final measurement

    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 6
    assert summary["test_acc"] == evals[-1]["test_acc"]
    assert summary["final_lambda1"] == records[-1]["lambda1"] > 0
    assert summary["mean_align"] is not None and summary["align_of"] == "perturbation"
    assert summary["track_seconds"] > 0 and summary["train_seconds"] > 0


def test_cosine_schedule_per_step(tmp_path: Path) -> None:
    train(tiny(tmp_path, method="sgd", lr=0.2))
    records = tracking.read_records(tmp_path / "run" / "metrics.jsonl")
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    expected = [0.1 * (1 + math.cos(math.pi * t / 6)) for t in range(6)]
    assert lrs == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_reports_what_it_aligns(tmp_path: Path, method: str) -> None:
    summary = train(tiny(tmp_path, method=method, epochs=1, track_every=2))
    assert math.isfinite(summary["test_loss"]) and summary["steps"] == 3
    no_perturbation = method in ("sgd", "egr")
    assert summary["align_of"] == ("gradient" if no_perturbation else "perturbation")


def test_existing_run_folder_is_not_overwritten(tmp_path: Path) -> None:
    config = tiny(tmp_path, epochs=1)
    train(config)
    with pytest.raises(ValueError, match="already holds a run; resume it"):
        Trainer(config)


# --------------------------------------------------------------------------------------------
# Tracking never changes the trajectory


@pytest.mark.parametrize("method", ["sgd", "eigen-sam", "x-sam"])
def test_tracking_does_not_change_the_weights(tmp_path: Path, method: str) -> None:
    common = dict(TINY_BN, method=method, eig_interval=2, epochs=1)
    train(TrainConfig(**common, out_dir=str(tmp_path / "off")))
    train(TrainConfig(**common, track_every=1, out_dir=str(tmp_path / "on")))
    off, on = final_state(tmp_path / "off"), final_state(tmp_path / "on")
    assert_same_state(off["model"], on["model"])  # weights and BatchNorm buffers
    assert torch.equal(off["rng"]["torch"], on["rng"]["torch"])
    assert [r["kind"] for r in on["records"]].count("track") == 3


def test_measurement_leaves_model_optimizer_and_rng_untouched() -> None:
    torch.manual_seed(0)
    data = make_synthetic(32, 8)
    model = build_model("resnet18", 10, 1, 28, width=0.0625)
    opt = build_optimizer(TrainConfig(method="eigen-sam", eig_interval=1).optimizer, model)
    closure = make_closure(model, torch.nn.CrossEntropyLoss(), data.train.images, data.train.labels)
    opt.step(closure)  # a tracker estimate and momentum exist
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    before = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [p.grad.clone() for p in model.parameters()],
        "rng": torch.get_rng_state(),
        "tracker": opt.tracker.state_dict(),
    }
    model.eval()
    record = SharpnessProbe(10, 1e-3, seed=0).measure(closure, model, opt)
    assert not model.training
    assert record["lambda1"] > 0
    assert_same_state(before["model"], model.state_dict())
    assert all(
        torch.equal(g, p.grad) for g, p in zip(before["grads"], model.parameters(), strict=True)
    )
    assert torch.equal(before["rng"], torch.get_rng_state())
    tracker = opt.tracker.state_dict()
    assert torch.equal(tracker["vector"], before["tracker"]["vector"])
    assert torch.equal(tracker["generator"], before["tracker"]["generator"])
    assert tracker["num_updates"] == before["tracker"]["num_updates"]


def test_eigen_sam_perturbation_is_the_one_applied_when_a_refresh_is_due() -> None:
    torch.manual_seed(0)
    data = make_synthetic(32, 8)
    model = build_model("simplecnn", 10, 1, 28, width=0.25)
    opt = build_optimizer(TrainConfig(method="eigen-sam", alpha=0.5).optimizer, model)
    closure = make_closure(model, torch.nn.CrossEntropyLoss(), data.train.images, data.train.labels)
    _, _, grad = SharpnessProbe(4, 1e-3, seed=0).top_eigenpair(closure, model)
    assert opt.tracker.vector is None and opt.tracker.due(opt.sam_steps)
    predicted, preview = applied_perturbation(opt, grad, closure)
    assert opt.tracker.vector is None  # the optimizer's own tracker is untouched
    applied = []
    ascend = opt._ascend  # the move to w + ε inside step()

    def recording_ascend(zero_grad: bool) -> None:
        params = opt._params()
        applied.append(opt.perturbation(flatten([p.grad for p in params], params)))
        ascend(zero_grad)

    opt._ascend = recording_ascend  # type: ignore[method-assign]
    opt.step(closure)
    torch.testing.assert_close(predicted, applied[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(preview.vector, opt.tracker.vector)
    sam_eps = 0.05 * grad / grad.norm()
    assert not torch.allclose(predicted, sam_eps, atol=1e-4)  # the refreshed v̂ matters


# --------------------------------------------------------------------------------------------
# Resume and interruption


def test_resume_equals_uninterrupted_bit_for_bit(tmp_path: Path) -> None:
    common = dict(
        TINY_BN, method="eigen-sam", eig_interval=2, track_every=2, checkpoint_every_steps=2
    )
    train(TrainConfig(**common, out_dir=str(tmp_path / "straight")))
    broken = TrainConfig(**common, out_dir=str(tmp_path / "broken"))
    # Interrupted in the second epoch, one step after the checkpoint at step 4.
    with pytest.raises(KeyboardInterrupt):
        train(broken, on_step=StopAt(5, KeyboardInterrupt()))
    records = tracking.read_records(tmp_path / "broken" / "metrics.jsonl")
    assert records[-1]["kind"] == "stopped" and records[-1]["reason"] == "KeyboardInterrupt"
    assert final_state(tmp_path / "broken")["step"] == 4
    assert not (tmp_path / "broken" / "summary.json").exists()

    summary = train(broken, resume=tmp_path / "broken")
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "broken")
    assert_same_state(straight["model"], resumed["model"])
    assert straight["optimizer"]["tracker"]["num_updates"] == 3
    assert torch.equal(
        straight["optimizer"]["tracker"]["vector"], resumed["optimizer"]["tracker"]["vector"]
    )
    for a, b in zip(
        straight["optimizer"]["base"]["state"].values(),
        resumed["optimizer"]["base"]["state"].values(),
        strict=True,
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert straight["scheduler"] == resumed["scheduler"]
    assert torch.equal(straight["rng"]["torch"], resumed["rng"]["torch"])
    metrics = tracking.read_records(tmp_path / "broken" / "metrics.jsonl")
    reference = tracking.read_records(tmp_path / "straight" / "metrics.jsonl")
    assert without_timing(metrics) == without_timing(reference)  # the stopped record is gone
    assert summary["status"] == "finished"


def test_resume_refuses_a_different_configuration(tmp_path: Path) -> None:
    config = tiny(tmp_path, epochs=1)
    train(config)
    with pytest.raises(ValueError, match=r"different configuration \(epochs: 1 -> 3\)"):
        Trainer(dataclasses.replace(config, epochs=3), resume=tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="holds no run"):
        Trainer(config, resume=tmp_path / "nothing")


def test_nan_loss_leaves_checkpoint_and_metrics_readable(tmp_path: Path) -> None:
    def poison(trainer: Trainer) -> None:
        if trainer.step == 4:  # one step into epoch 2; the epoch-1 checkpoint is at step 3
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(math.nan)

    config = tiny(tmp_path, method="sam")
    with pytest.raises(FloatingPointError, match=r"step 4: .*last checkpoint \(step 3\)"):
        train(config, on_step=poison)
    run = tmp_path / "run"
    state = final_state(run)
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    records = tracking.read_records(run / "metrics.jsonl")
    assert records[-1]["kind"] == "stopped" and records[-1]["reason"] == "FloatingPointError"
    assert [r["kind"] for r in records].count("eval") == 1
    assert train(config, resume=run)["steps"] == 6  # the run can be continued


def test_sgd_nan_loss_raises(tmp_path: Path) -> None:
    def poison(trainer: Trainer) -> None:
        with torch.no_grad():
            next(trainer.model.parameters()).fill_(math.inf)

    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(tiny(tmp_path, method="sgd"), on_step=poison)


def test_config_snapshot_round_trips_through_yaml(tmp_path: Path) -> None:
    config = tiny(tmp_path, method="x-sam", alpha=1.5, weight_decay=5e-5)
    Trainer(config)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config_from_dict(saved) == config
