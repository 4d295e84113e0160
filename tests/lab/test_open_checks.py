"""The seed's open checks as reproduction targets: (a) eigenvector stability, (b) the lr × weight
decay grid, (c) SDE weak error vs η with ρ constant, ∝ η^{1/2} and ∝ η^{1/3}. Planning and the
measurement arithmetic on synthetic vectors; no training."""

from __future__ import annotations

import math

import pytest
import torch

from eigensam.lab.experiments import reproduce
from eigensam.lab.experiments.runs import make_scale
from eigensam.lab.experiments.targets import grid, sde_eta, stability


def test_stability_measures_anchors_and_their_deltas_within_the_run():
    assert stability.measurement_steps([40, 240], [1, 10, 100, 300], 480) == [
        40, 41, 50, 140, 240, 241, 250, 340,
    ]  # fmt: skip
    assert stability.measurement_steps([500], [1], 480) == []  # anchor past the end
    with pytest.raises(ValueError, match="anchors must be steps >= 1"):
        stability.measurement_steps([0], [1], 10)


def test_stability_drift_is_the_sign_free_cosine_averaged_over_anchors():
    e = torch.eye(3, dtype=torch.float64)
    turned = math.cos(0.3) * e[0] + math.sin(0.3) * e[1]
    vectors = {1: e[0], 2: -2 * e[0], 11: turned, 5: e[1], 6: e[1], 15: e[2]}
    drift = stability.drift(vectors, anchors=[1, 5], deltas=[1, 10, 50])
    assert drift[1] == pytest.approx(1.0)  # sign and scale of v do not matter
    assert drift[10] == pytest.approx((math.cos(0.3) + 0.0) / 2)
    assert 50 not in drift


def test_stability_plans_three_architectures_at_two_learning_rates(tmp_path):
    scale = make_scale("cpu", tmp_path)
    plan = stability.configs(scale)
    assert len(plan) == 6 and {c.method for runs in plan.values() for c in runs} == {"eigen-sam"}
    assert {runs[0].model for runs in plan.values()} == {"simplecnn", "mlp", "vit-small"}
    assert sorted({runs[0].lr for runs in plan.values()}) == [0.01, 0.03]
    assert all([c.seed for c in runs] == [0, 1, 2] for runs in plan.values())
    run = plan["mlp lr=0.03"][0]
    assert run.run_dir.parent == tmp_path / "stability" / "runs" and run.track_every == 0
    assert run.train_subset == scale.base["train_subset"]  # the converged scale's data
    assert max(stability.ANCHORS) + max(stability.DELTAS) <= 480  # inside a 480-step run
    assert stability.plan(scale) == {}  # nothing for the engine pool


def test_grid_covers_every_cell_and_shares_the_base_cell_with_table1(tmp_path):
    scale = make_scale("cpu", tmp_path)
    plan = grid.plan(scale)
    assert len(plan) == len(grid.LRS) * len(grid.WEIGHT_DECAYS) * 2
    table1 = reproduce.TARGETS["table1"].plan(scale)
    base = grid.cell_label("sam", 0.03, 5e-5)
    assert plan[base] == table1["sam"]  # every seed, same folders
    assert plan[grid.cell_label("eigen-sam", 0.03, 5e-5)] == table1["eigen-sam"]
    other = plan[grid.cell_label("eigen-sam", 0.01, 5e-4)]
    assert [c.seed for c in other] == [0, 1, 2] and other[0].lr == 0.01
    assert other[0].weight_decay == 5e-4 and other[0].method == "eigen-sam"
    with pytest.raises(ValueError, match="CPU scale only"):
        grid.plan(make_scale("paper", tmp_path))


def test_sde_eta_check_sweeps_eta_for_three_rho_schedules(tmp_path):
    from eigensam.lab.sde import study

    config = sde_eta.sde_config(make_scale("cpu", tmp_path))
    assert config.eta_values == (0.04, 0.02, 0.01) and not config.figure2
    assert config.seeds == (0, 1, 2)
    assert study.SCALING_POWERS == {"eta^(1/3)": 1 / 3, "eta^(1/2)": 1 / 2, "eta^0": 0.0}
    with pytest.raises(ValueError, match="CPU scale only"):
        sde_eta.sde_config(make_scale("paper", tmp_path))
