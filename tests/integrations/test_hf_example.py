"""examples/hf_trainer_eigensam.py trains (a short run)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip(
    "transformers", reason='the [hf] extra is not installed (pip install "eigensam[hf]")'
)

EXAMPLE = Path(__file__).parents[2] / "examples" / "hf_trainer_eigensam.py"


@pytest.mark.filterwarnings("ignore:hvp='auto'.*finite differences:RuntimeWarning")
def test_example_loss_falls_below_the_uniform_prediction(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("hf_trainer_eigensam", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.train(steps=10, output_dir=str(tmp_path))
    sam = trainer.eigensam_optimizer
    assert sam.sam_steps == 10 and sam.tracker.num_updates == 1
    (logged,) = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged < math.log(256) - 0.2  # the mean over the first 10 steps, from ln 256 at init
