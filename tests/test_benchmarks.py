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
        ("eigen-sam/default", "power", 2, "eval", "auto", True),  # the library's default
    ],
)
def test_method_variants(method, method_attr, iters, mode, backend, batch):
    model = torch.nn.Linear(3, 2)
    opt = bench.make_optimizer(method, model, interval=100)
    assert opt.tracker.rule.name == method_attr and opt.tracker.iters == iters
    assert opt.tracker.mode == mode and opt.tracker.requested_backend == backend
    interval = 40 if method.endswith("/default") else 100
    assert opt.tracker.interval == interval and opt.hessian_parts == "auto"
    assert bench.takes_batch(method) is batch


def test_bn_cnn_has_batchnorm_after_every_convolution():
    model = bench.make_model("bn-cnn", "cpu")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 4  # one after each of SimpleCNN's four convolutions


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.parametrize("report", sorted(RESULTS.rglob("*.json")), ids=lambda p: p.name)
def test_saved_tables_are_rendered_from_their_report(report):
    """The docs include benchmarks/results/*.md: each is exactly what tables.py renders from
    the report beside it, so no figure there was typed or edited by hand."""
    import json

    import tables

    assert report.with_suffix(".md").read_text() == tables.render(json.loads(report.read_text()))


def test_summary_spans_the_rows_it_names():
    import tables

    rows = [
        {"model": "simplecnn", "method": m, "over_sam": r, "refresh_in_sgd_steps": s}
        for m, r, s in [
            ("sam", 1.0, 0.0),
            ("eigen-sam", 1.081, 15.0),
            ("eigen-sam/whole", 1.04, 10.0),
            ("eigen-sam/default", 1.034, 6.0),
        ]
    ]
    rows += [{**rows[1], "over_sam": 1.069, "refresh_in_sgd_steps": 12.0}]
    rows += [{**rows[2], "refresh_in_sgd_steps": 10.0}]
    summary = dict(tables.summary_rows({"time": rows}))
    assert summary["Eigen-SAM / SAM step time over p = 100, q = 5 (`batch=`)"] == "1.07-1.08×"
    assert summary["refresh with `batch=` longer than with a plain closure by"] == "20-50 %"
    default = "Eigen-SAM / SAM step time over p = 40, q = 2, the default (`batch=`)"
    assert summary[default] == "1.03×"  # one row: one value, no span
    assert summary["refresh of q = 2 products, the default, `batch=` (4 parts)"] == "6.0 SGD steps"
