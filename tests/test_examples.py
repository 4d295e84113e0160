"""The example scripts in examples/ run and train."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

import eigensam

EXAMPLES = Path(__file__).parents[1] / "examples"
SRC = Path(eigensam.__file__).parents[1]


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lightning_example_trains_one_short_epoch() -> None:
    pytest.importorskip("lightning")
    example = load_example("lightning_eigensam")
    torch.manual_seed(0)
    initial = example.EigenSAMClassifier()
    model = example.train(epochs=1, limit_train_batches=12)
    x, y = example.synthetic_data().tensors
    initial.eval(), model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x), y) < 0.8 * F.cross_entropy(initial(x), y)
    opt = model.optimizers().optimizer
    assert opt.sam_steps == 12 and opt.tracker.num_updates == 2  # refreshed at steps 0 and 10
    # Only the first pass of each step updated BatchNorm (not the second pass, not the HVPs).
    assert int(model.net[1].num_batches_tracked) == 12


@pytest.mark.slow
def test_ddp_example_runs_under_torchrun(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    script = [str(EXAMPLES / "ddp_train.py"), "--epochs", "2", "--sharpness", "local"]
    done = subprocess.run(
        [*command, "2", *script, "--checkpoint", str(tmp_path / "ckpt.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    losses = [
        float(line.split("train loss ")[1].split(",")[0]) for line in done.stdout.splitlines()
    ]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["epoch"] == 2


@pytest.mark.slow
def test_fsdp_example_trains_and_resumes_under_torchrun(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    script = [str(EXAMPLES / "fsdp_train.py"), "--checkpoint", str(tmp_path / "ckpt")]
    records = []
    for extra in (["--epochs", "2"], ["--epochs", "3", "--resume"]):
        done = subprocess.run(
            [*command, "2", *script, *extra], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        records += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["epoch"] for r in records] == [1, 2, 3]  # the resumed run starts at epoch 3
    losses = [r["train_loss"] for r in records]
    assert losses[2] < losses[1] < losses[0]
    assert (tmp_path / "ckpt" / ".metadata").is_file() and not (tmp_path / "ckpt.new").exists()
