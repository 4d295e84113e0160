"""The cost benchmark's method names mean what its tables say."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_optimizers")


@pytest.mark.parametrize(
    ("method", "method_attr", "iters", "mode", "backend", "batch"),
    [
        ("eigen-sam", "power", 5, "eval", "auto", True),  # the documented path
        ("x-sam", "power", 5, "eval", "auto", True),
        ("eigen-sam/lanczos4", "lanczos", 4, "eval", "auto", True),
        ("eigen-sam/fd-forward", "power", 5, "eval", "fd-forward", True),
        ("eigen-sam/whole", "power", 5, "eval", "auto", False),
        ("eigen-sam/train", "power", 5, "train", "auto", False),
    ],
)
def test_method_variants(method, method_attr, iters, mode, backend, batch):
    model = torch.nn.Linear(3, 2)
    opt = bench.make_optimizer(method, model, interval=100)
    assert opt.tracker.method == method_attr and opt.tracker.iters == iters
    assert opt.tracker.mode == mode and opt.tracker.requested_backend == backend
    assert opt.tracker.interval == 100 and opt.hessian_parts == "auto"
    assert bench.takes_batch(method) is batch


def test_bn_cnn_has_batchnorm_after_every_convolution():
    model = bench.make_model("bn-cnn", "cpu")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 4  # one after each of SimpleCNN's four convolutions
