"""``eval_every``: the test set is evaluated every n epochs and after the last one."""

from __future__ import annotations

import pytest
from tiny_runs import tiny

from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.train import Trainer


def test_eval_every_skips_epochs_but_never_the_last(tmp_path):
    config = tiny(tmp_path, epochs=3, eval_every=2)
    summary = Trainer(config).run()
    evals = [
        r
        for r in tracking.read_records(config.run_dir / tracking.METRICS_FILE)
        if r["kind"] == "eval"
    ]
    assert [r["epoch"] for r in evals] == [1, 2, 3]
    assert [r["test_acc"] is None for r in evals] == [True, False, False]
    assert summary["test_acc"] == evals[-1]["test_acc"]


def test_eval_every_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="eval_every"):
        tiny(tmp_path, eval_every=0)
