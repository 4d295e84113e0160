"""`eigensam spectrum` and `eigensam power-convergence` on a tiny trained run."""

import json

import pytest

from eigensam.cli import main
from eigensam.lab.curvature_reports import blocks_table, power_convergence_report
from eigensam.lab.engine.trained_model import fixed_batches, load_trained


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "eigen"
    argv = ["train", "--config", "configs/cpu-synthetic-simplecnn.yaml", "--out", str(out)]
    assert main(argv + ["--set", "epochs=1", "--set", "track_every=0"]) == 0
    return out


def test_spectrum_writes_json_and_png(run_dir, tmp_path, capsys):
    argv = ["spectrum", str(run_dir), "--data-subset", "64", "--top-k", "2", "--out", str(tmp_path)]
    assert main(argv + ["--lanczos-iters", "20", "--trace-matvecs", "12"]) == 0
    report = json.loads((tmp_path / "spectrum.json").read_text())
    first, second = (e["eigenvalue"] for e in report["eigenvalues"])
    assert first >= second
    assert (tmp_path / "spectrum.png").stat().st_size > 0
    assert "top eigenvalues" in capsys.readouterr().out


def test_power_convergence_uses_tracker_vector(run_dir, tmp_path):
    argv = ["power-convergence", str(run_dir), "--data-subset", "32", "--max-steps", "4"]
    assert main(argv + ["--out", str(tmp_path)]) == 0
    assert (tmp_path / "power_convergence.png").stat().st_size > 0
    assert json.loads((tmp_path / "power_convergence.json").read_text())


def test_bad_checkpoint_and_subset(run_dir, tmp_path, capsys):
    assert main(["spectrum", str(tmp_path / "missing")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main(["spectrum", str(run_dir), "--data-subset", "0"]) == 2
    assert "data_subset" in capsys.readouterr().err


def test_spectrum_per_layer_gives_each_layers_lambda_and_trace(run_dir, tmp_path, capsys):
    argv = ["spectrum", str(run_dir), "--data-subset", "32", "--per-layer", "--out", str(tmp_path)]
    assert main(argv + ["--trace-matvecs", "6"]) == 0
    report = json.loads((tmp_path / "spectrum_blocks.json").read_text())
    blocks = [row["block"] for row in report["blocks"]]
    assert blocks[0] == "features.0" and blocks[-1].startswith("classifier")
    assert all(row["lambda_max"]["eigenvalue"] > 0 for row in report["blocks"])
    assert (tmp_path / "spectrum_blocks.png").stat().st_size > 0
    table = (tmp_path / "spectrum_blocks.md").read_text()
    assert table == blocks_table(report) and table in capsys.readouterr().out
    assert table.count("\n") == 2 + len(blocks) and "| features.0 | " in table


def test_spectrum_per_layer_of_the_ggn_on_chosen_blocks(run_dir, tmp_path):
    argv = ["spectrum", str(run_dir), "--data-subset", "32", "--per-layer", "--curvature", "ggn"]
    argv += ["--blocks", "*.bias,classifier", "--trace-matvecs", "6", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "spectrum_blocks.json").read_text())
    assert report["settings"]["curvature"] == "ggn"
    assert [row["block"] for row in report["blocks"]] == ["*.bias", "classifier"]
    assert all(name.endswith(".bias") for name in report["blocks"][0]["parameters"])


def test_spectrum_block_matching_nothing_is_one_error_line(run_dir, tmp_path, capsys):
    argv = ["spectrum", str(run_dir), "--data-subset", "32", "--per-layer", "--blocks", "conv9"]
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'conv9' matches no trainable parameter" in err and len(err.strip().splitlines()) == 1
    assert main(["spectrum", str(run_dir), "--blocks", "features.0"]) == 2
    assert "--blocks needs --per-layer" in capsys.readouterr().err


def test_spectrum_of_the_ggn(run_dir, tmp_path):
    argv = ["spectrum", str(run_dir), "--data-subset", "32", "--curvature", "ggn"]
    argv += ["--lanczos-iters", "10", "--trace-matvecs", "6", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "spectrum.json").read_text())
    assert report["settings"]["curvature"] == "ggn" and report["settings"]["backend"] is None
    assert report["lambda_max"] > 0  # positive semi-definite: its top eigenvalue is >= 0
    assert report["num_matvecs"]["determinism_check"] == 0


def test_power_convergence_report_of_the_ggn(run_dir, tmp_path):
    trained = load_trained(run_dir)
    batches = fixed_batches(trained.config, 32, 16)
    report = power_convergence_report(
        trained.model, batches, tmp_path, max_steps=3, curvature="ggn", warm_start=batches[:1]
    )
    assert report["settings"]["curvature"] == "ggn"
    assert report["reference"]["eigenvalue"] > 0
