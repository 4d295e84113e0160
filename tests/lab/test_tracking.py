"""Tests for eigensam.lab.engine.run_folder: atomic files, JSONL, statistics, tables and plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import IO

import pytest

from eigensam.lab.engine import run_folder as tracking


def test_atomic_write_replaces_or_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "file.txt"
    tracking.write_text(path, "old")

    def broken(f: IO[bytes]) -> None:
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        tracking.atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]  # no temporary file left
    tracking.write_text(path, "new")
    assert path.read_text() == "new"


def test_records_survive_a_cut_short_append(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tracking.append_record(path, {"kind": "train", "loss": 1.5})
    tracking.append_record(path, {"kind": "eval", "test_loss": math.nan})
    with open(path, "a") as f:
        f.write('{"kind": "tra')  # a kill during the next append
    records = tracking.read_records(path)
    assert records[0] == {"kind": "train", "loss": 1.5}
    assert math.isnan(records[1]["test_loss"]) and len(records) == 2
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        tracking.read_records(path)
    tracking.write_records(path, [{"a": 1}])
    assert tracking.read_records(path) == [{"a": 1}]


def test_t_quantile_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 41), 57, 100, 1000]:
        assert tracking.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-10)
    with pytest.raises(ValueError, match="df must be an integer >= 1, got 0"):
        tracking.t_quantile_975(0)


def test_mean_ci_and_formatting() -> None:
    assert tracking.mean_ci([2.0]) == (2.0, None)
    mean, half = tracking.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))
    with pytest.raises(ValueError, match="values must not be empty"):
        tracking.mean_ci([])
    assert tracking.format_estimate([0.9], 2, scale=100) == "90.00"
    assert tracking.format_estimate([0.5, 0.7, None], 1) == "0.6 ± 1.3"
    assert tracking.format_estimate([None, math.nan], 3) == "–"


def test_summary_table_rows_and_notes() -> None:
    runs = {
        "sgd": [{"test_acc": 0.8, "align_of": "gradient"}, {"test_acc": 0.9}],
        "sam": [{"test_acc": 0.85, "final_lambda1": 2.0, "align_of": "perturbation"}],
    }
    table = tracking.summary_table(runs)
    lines = table.splitlines()
    assert lines[0].startswith("| method | runs | test acc (%) | test loss | final λ₁ |")
    assert lines[2] == "| sgd | 2 | 85.00 ± 63.53 | – | – | – | – | – |"
    assert lines[3] == "| sam | 1 | 85.00 | – | 2.000 | – | – | – |"
    assert "- sgd: no perturbation is applied; Align is that of the gradient." in table


def test_mean_curve_averages_runs_at_each_x() -> None:
    runs = [
        [{"kind": "track", "step": 0, "lambda1": 1.0}, {"kind": "track", "step": 5, "lambda1": 3}],
        [{"kind": "track", "step": 0, "lambda1": 2.0}, {"kind": "eval", "step": 5, "lambda1": 9}],
        [{"kind": "track", "step": 5, "lambda1": None}],
    ]
    assert tracking.mean_curve(runs, "track", "step", "lambda1") == ([0, 5], [1.5, 3.0])


def test_plot_curves_writes_a_png_even_without_measurements(tmp_path: Path) -> None:
    path = tmp_path / "plot.png"
    records = [{"kind": "eval", "epoch": 1, "step": 3, "test_acc": 0.5}]
    tracking.plot_curves({"sgd": [records]}, path, "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_test_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    a = [0.81, 0.79, 0.83, 0.80, 0.82]
    b = [0.80, 0.79, 0.81, 0.79, 0.80]
    result = tracking.paired_test(a, b)
    reference = scipy_stats.ttest_rel(a, b)
    assert result["p"] == pytest.approx(reference.pvalue, rel=1e-9)
    assert result["mean_diff"] == pytest.approx(0.012)
    low, high = reference.confidence_interval()
    assert result["ci"] == pytest.approx((high - low) / 2, rel=1e-9)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10])
def test_t_central_matches_scipy(df):
    scipy_stats = pytest.importorskip("scipy.stats")
    for t in (0.1, 1.0, 2.5, 6.0):
        expected = scipy_stats.t.cdf(t, df) - scipy_stats.t.cdf(-t, df)
        assert tracking.t_central(t, df) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_paired_test_edge_cases():
    assert tracking.paired_test([1.0], [0.5])["p"] is None
    assert tracking.paired_test([1.0, 2.0], [0.5, 1.5])["p"] == 0.0
    with pytest.raises(ValueError, match="pair up"):
        tracking.paired_test([1.0], [1.0, 2.0])
