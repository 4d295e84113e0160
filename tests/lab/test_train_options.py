"""Engine options added for the reproduction suite: fixed-batch tracking, snapshots, He
initialization, Eigen-SAM alpha='auto' and the spread eigenvector schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_runs import tiny

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.optimizers import build_optimizer
from eigensam.lab.engine.train import Trainer, snapshot_file, train
from eigensam.optim import EigenSAM


def test_fixed_batch_tracking_records_means_and_leaves_trajectory_alone(tmp_path):
    plain = train(tiny(tmp_path / "a", method="eigen-sam", eig_interval=2, track_every=2))
    fixed = train(
        tiny(tmp_path / "b", method="eigen-sam", eig_interval=2, track_every=2, track_batches=2)
    )
    assert plain["test_loss"] == fixed["test_loss"]  # tracking never changes the trajectory
    records = tracking.read_records(Path(fixed["run_dir"]) / tracking.METRICS_FILE)
    tracks = [r for r in records if r["kind"] == "track"]
    assert tracks and all(r["fixed_lambda1"] is not None for r in tracks)
    assert all(1 - 2**0.5 <= r["fixed_align"] <= 1 for r in tracks)
    assert fixed["mean_fixed_align"] is not None and plain["mean_fixed_align"] is None


def test_snapshot_epochs_keep_a_checkpoint(tmp_path):
    summary = train(tiny(tmp_path, snapshot_epochs=[1]))
    run = Path(summary["run_dir"])
    snapshot = tracking.load_checkpoint(run / snapshot_file(1))
    assert snapshot["epoch"] == 1 and snapshot["step"] == 3
    assert not (run / snapshot_file(2)).exists()


def test_kaiming_init_changes_only_the_initialization(tmp_path):
    default = Trainer(tiny(tmp_path / "a"))
    he = Trainer(tiny(tmp_path / "b", init="kaiming"))
    weight = he.model.features[0].weight.detach()
    fan_in = weight[0].numel()
    assert not torch.equal(default.model.features[0].weight.detach(), weight)
    assert float(weight.std()) == pytest.approx((2 / fan_in) ** 0.5, rel=0.3)
    assert float(he.model.features[0].bias.detach().abs().max()) == 0


def test_auto_alpha_and_spread_schedule_reach_the_optimizer(tmp_path):
    config = tiny(
        tmp_path, method="eigen-sam", alpha="auto", target_align=0.3, eig_schedule="spread"
    )
    opt = build_optimizer(config.optimizer, Trainer(config).model)
    assert isinstance(opt, EigenSAM)
    assert opt.param_groups[0]["alpha"] == "auto" and opt.target_align == 0.3
    assert opt.tracker.rule.name == "spread"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(method="sam", alpha="auto"), "alpha='auto' is defined for method eigen-sam"),
        (dict(method="eigen-sam", target_align=1.0), "target_align"),
        (dict(method="eigen-sam", eig_schedule="often"), "eig_schedule"),
        (dict(eig_schedule="spread", eig_method="lanczos"), "spread needs eig_method power"),
        (dict(init="xavier"), "init must be one of"),
        (dict(track_batches=-1), "track_batches"),
        (dict(snapshot_epochs=[0]), "snapshot_epochs entry"),
    ],
)
def test_bad_options_are_named(tmp_path, overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny(tmp_path, **overrides)
