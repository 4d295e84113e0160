"""The engine with ``strategy: fsdp`` (FSDP2) on 2 gloo processes: torchrun, rank-0 output,
sharded checkpoints, SIGKILL then --resume, and bad input refused on every rank."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from harness import run_ranks
from test_ddp_engine import HERE, torchrun, without_timing
from tiny_runs import TINY

from eigensam.hessian.hvp import FD_FALLBACK
from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.config import TrainConfig
from eigensam.lab.engine.train import Trainer
from eigensam.lab.engine.trained_model import load_trained

# The lab's small ViT (dim 16), TINY's 96 synthetic samples, global batch 32: 3 steps per epoch.
CONFIG = dict(
    TINY,
    model="vit-small",
    epochs=3,
    method="eigen-sam",
    eig_interval=2,
    eig_iters=3,
    strategy="fsdp",
)


def sharded_weights(run: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """One process reads a run's last checkpoint (``load_trained``: DCP gathers the shards,
    2 -> 1): the whole model's weights, v̂ in parameter order, and the checkpoint's state."""
    trained = load_trained(run)
    assert trained.tracker_vector is not None
    state = tracking.load_checkpoint(run / tracking.CHECKPOINT_FILE)
    return trained.model.state_dict(), trained.tracker_vector, state


@pytest.mark.slow  # 3 torchrun jobs and a one-process run: about 2 min on a busy 2-core CPU
def test_fsdp_run_killed_then_resumed_equals_the_whole_run(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    # Tracking too: its warm-start vectors are shards, saved in the sharded checkpoint.
    config_file.write_text(yaml.safe_dump({**CONFIG, "track_every": 2, "track_iters": 4}))
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    done = torchrun("-m", "eigensam", "train", "--config", str(config_file), "--out", str(whole))
    assert done.returncode == 0, done.stderr
    assert f"run folder: {whole}" in done.stdout and done.stdout.count("run folder") == 1
    # One sharded folder, named by the checkpoint file; no whole model in the file.
    state = tracking.load_checkpoint(whole / tracking.CHECKPOINT_FILE)
    assert state["model"] is None and state["optimizer"] is None
    assert state["sharded"] == "checkpoint-step9.dcp"
    assert [p.name for p in whole.glob("*.dcp")] == ["checkpoint-step9.dcp"]

    # Rank 1 dies during the second epoch (step 5 of 9), after epoch 1's checkpoint.
    died = torchrun(str(HERE / "die_at_step.py"), str(config_file), str(killed), "1", "5")
    assert died.returncode != 0
    saved = tracking.load_checkpoint(killed / tracking.CHECKPOINT_FILE)
    assert (saved["epoch"], saved["step"], saved["sharded"]) == (1, 3, "checkpoint-step3.dcp")

    resumed = torchrun("-m", "eigensam", "train", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    a_weights, a_vector, a = sharded_weights(whole)
    b_weights, b_vector, b = sharded_weights(killed)
    assert a["step"] == b["step"] == 9
    for key, value in a_weights.items():
        assert torch.equal(value, b_weights[key]), key
    assert torch.equal(a_vector, b_vector) and bool(a_vector.any())
    assert without_timing(a["records"]) == without_timing(b["records"])
    assert sum(r["kind"] == "track" for r in a["records"]) == 5  # steps 0, 2, 4, 6, 8
    logged = [tracking.read_records(run / tracking.METRICS_FILE) for run in (whole, killed)]
    assert without_timing(logged[0]) == without_timing(logged[1])  # each record once

    # Two FSDP2 processes with 16 samples each follow one process with the batch of 32 (the
    # same finite-difference products; float32).
    single = Trainer(
        TrainConfig(
            **{**CONFIG, "strategy": "ddp", "hvp": FD_FALLBACK, "out_dir": str(tmp_path / "one")}
        )
    )
    single.run()
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(a_weights[key], value, rtol=1e-3, atol=1e-4)


def mismatched_strategy_worker(rank: int, world: int, folder: Path) -> None:
    """One rank asks for FSDP, the other for DDP: the configuration check fails on both."""
    config = TrainConfig(
        **{**CONFIG, "out_dir": str(folder / "run"), "strategy": ("fsdp", "ddp")[rank]}
    )
    with pytest.raises(ValueError, match=r"disagree on the training configuration.*strategy"):
        Trainer(config)
    assert not (folder / "run").exists()


def test_ranks_with_different_strategies_fail_fast(tmp_path: Path) -> None:
    run_ranks(mismatched_strategy_worker, tmp_path, timeout=120)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # The library's refusals (eigensam.optim.fsdp2), named for the configuration.
        ({"hvp": "autograd"}, "strategy fsdp: hvp='autograd' .* not available under FSDP2.*fd-"),
        ({"sharpness": "local"}, "strategy fsdp: sharpness='local' .* not supported under FSDP2"),
        ({"method": "egr", "hvp": "autograd"}, "strategy fsdp: hvp='autograd'"),
        (
            {"track_every": 2, "track_hvp": "autograd"},
            "strategy fsdp: track_every 2 with track_hvp autograd: .*fd-central",
        ),
        ({"strategy": "fsdp1"}, "strategy must be one of ddp, fsdp; got 'fsdp1'"),
    ],
)
def test_fsdp_configuration_refusals(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**CONFIG, **overrides})


def test_fsdp_needs_torchrun_and_matching_checkpoints(tmp_path: Path) -> None:
    alone = TrainConfig(**{**CONFIG, "out_dir": str(tmp_path / "alone")})
    with pytest.raises(ValueError, match="strategy fsdp shards .* this process runs alone"):
        Trainer(alone)
    assert not (tmp_path / "alone").exists()
    # A DDP (single-process) run cannot be resumed as an FSDP run: its checkpoint is whole.
    ddp = TrainConfig(**{**CONFIG, "strategy": "ddp", "epochs": 1, "out_dir": str(tmp_path / "d")})
    Trainer(ddp).run()
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    with pytest.raises(ValueError, match="strategy"):
        Trainer(dataclasses.replace(ddp, strategy="fsdp"), resume=tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == files


@pytest.mark.slow  # a torchrun job and a one-process run: about 40 s on a busy 2-core CPU
def test_fsdp_run_reports_sharpness_as_one_process(tmp_path: Path) -> None:
    """``track_every`` under FSDP2: λ₁ and Align(ε, v₁) by sharded Lanczos on finite
    differences of FSDP's gradients, as one process on the concatenated batch (float32)."""
    config = {**CONFIG, "epochs": 1, "track_every": 1, "track_iters": 10, "track_tol": 1e-6}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    done = torchrun(
        "-m", "eigensam", "train", "--config", str(config_file), "--out", str(tmp_path / "fsdp")
    )
    assert done.returncode == 0, done.stderr
    single = Trainer(
        TrainConfig(
            **{
                **config,
                "strategy": "ddp",
                "hvp": FD_FALLBACK,
                "track_hvp": FD_FALLBACK,
                "out_dir": str(tmp_path / "one"),
            }
        )
    )
    single.run()
    runs = [
        tracking.read_records(tmp_path / name / tracking.METRICS_FILE) for name in ("fsdp", "one")
    ]
    tracks = [[r for r in records if r["kind"] == "track"] for records in runs]
    assert [r["step"] for r in tracks[0]] == [r["step"] for r in tracks[1]] == [0, 1, 2]
    for sharded, one in zip(*tracks, strict=True):
        assert sharded["lambda1"] > 0 and sharded["align"] is not None
        assert sharded["lambda1"] == pytest.approx(one["lambda1"], rel=1e-3)
        assert sharded["align"] == pytest.approx(one["align"], abs=1e-3)
        assert sharded["abs_cos"] == pytest.approx(one["abs_cos"], abs=1e-3)
    finals = [[r for r in records if r["kind"] == "final_sharpness"] for records in runs]
    assert finals[0][0]["lambda1"] == pytest.approx(finals[1][0]["lambda1"], rel=1e-3)
