"""The label-noise and data-size targets: their plans (no training), shared runs and claims."""

from __future__ import annotations

import pytest

from eigensam.lab.experiments.runs import check_runs, make_scale
from eigensam.lab.experiments.targets import datasize, decide, headline, noise


def test_noise_plans_every_method_at_each_noise_level(tmp_path):
    scale = make_scale("cpu", tmp_path, seeds=(0, 1, 2))
    plan = noise.plan(scale)
    assert set(plan) == {f"{m} noise={p:g}" for m in noise.METHODS for p in (0.2, 0.4)}
    sgd, sam = plan["sgd noise=0.4"][0], plan["sam noise=0.4"][0]
    assert (sgd.label_noise, sgd.epochs, sam.epochs) == (0.4, 120, 60)
    assert sam.run_dir.name == "sam-label_noise0.4-seed0"
    assert all(len(runs) == 3 for runs in plan.values())
    # The noisy runs never share a folder with the clean headline runs.
    clean = {c.run_dir for runs in headline.plan(scale).values() for c in runs}
    assert not clean & {c.run_dir for runs in plan.values() for c in runs}
    claims = [s.claim for s in noise.SPECS]
    assert (
        claims[0] == "SAM has a higher held-out accuracy than SGD (2× epochs) under 20% label noise"
    )
    assert len(claims) == 4 and all(s.metric == "held_out_acc" for s in noise.SPECS)


def test_datasize_shares_the_small_runs_and_adds_4096_images(tmp_path):
    scale = make_scale("cpu", tmp_path)
    plan = datasize.plan(scale)
    small = decide.plan(scale)
    assert plan["sam n=1024"] == small["sam"][:5] and plan["sgd n=1024"] == small["sgd"][:5]
    large = plan["sgd n=4096"][0]
    assert (large.train_subset, large.epochs, large.width) == (4096, 120, 0.25)
    configs = [c for runs in plan.values() for c in runs]
    assert len(check_runs(configs)) == 20
    assert datasize.SPECS[0].paper.effect == 0.5 and datasize.SPECS[0].a == "sam n=4096"


@pytest.mark.parametrize("target", [noise, datasize, decide])
def test_the_regimes_run_at_cpu_scale_only(target):
    with pytest.raises(ValueError, match="CPU scale"):
        target.plan(make_scale("paper", "runs/x"))


def test_table2_pilot_rule_needs_both_two_pass_methods_converged():
    from eigensam.lab.experiments.pilot import choose_finetune_steps

    def pilot(method, steps, acc):
        return {"kind": "finetune-pilot", "method": method, "steps": steps, "train_acc": acc}

    records = [
        pilot("sgd", 1200, 0.996),  # SGD at 2N = 1200 converged: not enough for N = 600
        pilot("sam", 600, 0.959),
        pilot("eigen-sam", 600, 0.958),
        pilot("sam", 1200, 0.992),
        pilot("eigen-sam", 1200, 0.985),
        pilot("sam", 1800, 0.995),
        pilot("eigen-sam", 1800, 0.991),
        pilot("sam", 2400, 0.999),
        pilot("eigen-sam", 2400, 0.999),
        {"kind": "pilot", "steps": 10, "train_acc": 1.0},
    ]
    assert choose_finetune_steps(records) == 1800
    assert choose_finetune_steps(records, ("sam",)) == 1200
    assert choose_finetune_steps(records[:3]) is None
