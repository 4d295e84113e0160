"""The cost benchmark's method names mean what its tables say."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_optimizers")


@pytest.mark.parametrize(
    ("method", "method_attr", "iters", "mode", "parts", "reuse"),
    [
        ("eigen-sam", "power", 5, "train", 1, True),
        ("eigen-sam/lanczos4", "lanczos", 4, "train", 1, True),
        ("eigen-sam/split4", "power", 5, "train", 4, True),
        ("x-sam/eval-split4", "power", 5, "eval", 4, True),
        ("eigen-sam/no-reuse", "power", 5, "train", 1, False),
    ],
)
def test_method_variants(method, method_attr, iters, mode, parts, reuse):
    model = torch.nn.Linear(3, 2)
    opt = bench.make_optimizer(method, model, interval=100)
    assert opt.tracker.method == method_attr and opt.tracker.iters == iters
    assert opt.tracker.mode == mode and opt.reuse_gradient is reuse
    assert opt.tracker.interval == 100 and bench.parts_of(method) == parts
