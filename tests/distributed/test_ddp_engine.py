"""The engine and the command on 2 gloo processes: torchrun, sharding, rank-0 output, resume."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from harness import run_ranks
from tiny_runs import TINY

import eigensam
from eigensam import cli
from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.config import TrainConfig
from eigensam.lab.engine.launch import Ranks, join, leave
from eigensam.lab.engine.train import Trainer

HERE = Path(__file__).parent
SRC = Path(eigensam.__file__).parents[1]
# TINY (96 synthetic samples), global batch 32: 3 steps per epoch, 16 samples per rank and step.
CONFIG = dict(
    TINY, epochs=3, method="eigen-sam", eig_interval=2, eig_iters=3, track_every=2, track_iters=4
)


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (a free port), with a deadline."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*command, "--nproc_per_node", "2", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records]


def test_kill_one_rank_then_resume_loses_no_finished_epoch(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(CONFIG))
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    done = torchrun("-m", "eigensam", "train", "--config", str(config_file), "--out", str(whole))
    assert done.returncode == 0, done.stderr
    assert f"run folder: {whole}" in done.stdout and done.stdout.count("run folder") == 1

    # Rank 1 dies during the second epoch (step 5 of 9), after epoch 1's checkpoint.
    died = torchrun(str(HERE / "die_at_step.py"), str(config_file), str(killed), "1", "5")
    assert died.returncode != 0
    saved = tracking.load_checkpoint(killed / tracking.CHECKPOINT_FILE)
    assert (saved["epoch"], saved["step"]) == (1, 3)
    evals = [
        r for r in tracking.read_records(killed / tracking.METRICS_FILE) if r["kind"] == "eval"
    ]
    assert [r["epoch"] for r in evals] == [1]

    resumed = torchrun("-m", "eigensam", "train", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    a = tracking.load_checkpoint(whole / tracking.CHECKPOINT_FILE)
    b = tracking.load_checkpoint(killed / tracking.CHECKPOINT_FILE)
    assert a["step"] == b["step"] == 9
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["optimizer"]["tracker"]["vector"], b["optimizer"]["tracker"]["vector"])
    assert without_timing(a["records"]) == without_timing(b["records"])
    logged = [tracking.read_records(run / tracking.METRICS_FILE) for run in (whole, killed)]
    assert without_timing(logged[0]) == without_timing(logged[1])  # each record once

    # Two processes with 16 samples each run the algorithm of one with the batch of 32.
    single = Trainer(TrainConfig(**{**CONFIG, "out_dir": str(tmp_path / "single")}))
    single.run()
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-3, atol=1e-4)


def mismatched_config_worker(rank: int, world: int, folder: Path) -> None:
    config = TrainConfig(**{**CONFIG, "out_dir": str(folder / "run"), "rho": 0.05 * (rank + 1)})
    with pytest.raises(ValueError, match=r"disagree on the training configuration.*'rho': 0\.1"):
        Trainer(config)
    odd = dataclasses.replace(config, rho=0.05, batch_size=31)
    with pytest.raises(ValueError, match="batch_size 31 .* divisible by the number of proc"):
        Trainer(odd)
    assert not (folder / "run").exists()


def test_mismatched_configuration_fails_fast(tmp_path: Path) -> None:
    run_ranks(mismatched_config_worker, tmp_path)


def test_python_dash_m_runs_the_command() -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-m", "eigensam", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "usage: eigensam" in done.stdout


# os._exit is replaced so the script can record what leave() did before it ends the process.
JOIN_THEN_LEAVE = """
import os
import sys
from pathlib import Path

import torch.distributed as dist
from eigensam.lab.engine import launch as distributed

ranks = distributed.join("cpu")
assert dist.is_initialized() and ranks.world_size == 2, ranks
record = Path(sys.argv[2], f"rank{ranks.rank}.txt")
os._exit = lambda code: record.write_text(f"exit {code} group {dist.is_initialized()}")
distributed.leave(int(sys.argv[1]))
if dist.is_initialized():  # after a failure leave() keeps it: destroy it before the shutdown
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("code, group_left", [(0, False), (3, True)])
def test_leave_ends_the_process_and_destroys_the_group_after_success(
    tmp_path: Path, code: int, group_left: bool
) -> None:
    script = tmp_path / "join_then_leave.py"
    script.write_text(JOIN_THEN_LEAVE)
    done = torchrun(str(script), str(code), str(tmp_path))
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"exit {code} group {group_left}"


def caller_group_worker(rank: int, world: int, folder: Path) -> None:
    assert join("cpu") == Ranks(rank, world, rank)
    leave(0)  # returns: the group and the process are the caller's
    assert torch.distributed.is_initialized()


def test_leave_keeps_a_group_the_caller_created(tmp_path: Path) -> None:
    run_ranks(caller_group_worker, tmp_path)


@pytest.mark.parametrize("code", [0, 1])
def test_the_command_ends_through_leave_with_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(cli, "_run_train", lambda args: code)
    monkeypatch.setattr(cli, "leave", calls.append)
    assert cli.main(["train"]) == code
    assert calls == [code]


def test_an_input_error_also_ends_through_leave(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(cli, "leave", calls.append)
    assert cli.main(["train"]) == 2  # neither --config nor --resume
    assert calls == [2]
