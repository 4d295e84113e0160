"""Tests for the ``eigensam`` command: compare, train, resume and error reporting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eigensam import cli
from eigensam.lab import experiments
from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.train import Trainer

TINY_FLAGS = [
    "--dataset",
    "synthetic",
    "--model",
    "simplecnn",
    "--width",
    "0.25",
    "--train-subset",
    "64",
    "--batch-size",
    "32",
    "--track-every",
    "2",
    "--set",
    "track_iters=6",
]

TINY_YAML = """\
dataset: synthetic
train_subset: 64
model: simplecnn
width: 0.25
method: sam
epochs: 2
batch_size: 32
weight_decay: 5e-5
track_every: 2
track_iters: 6
"""


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *words: str) -> None:
    """One ``eigensam: error:`` message (progress lines of a run may come before it)."""
    assert len([line for line in err.splitlines() if line.startswith("eigensam: error: ")]) == 1
    assert "Traceback" not in err
    for word in words:
        assert word in err


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--dataset", "imagenet"], ["dataset must be one of", "fashion-mnist", "'imagenet'"]),
        (["--model", "vgg"], ["model must be one of", "simplecnn", "resnet18", "'vgg'"]),
        (["--methods", "sgd,adamw"], ["method must be one of", "eigen-sam", "'adamw'"]),
        (["--methods", "sgd,sgd"], ["methods lists sgd more than once"]),
        (["--epochs", "0"], ["epochs must be an integer >= 1, got 0"]),
        (["--set", "alpha=3", "--methods", "x-sam"], ["alpha must be in [0, 2]"]),
        (["--set", "colour=red"], ["unknown config keys ['colour']", "valid keys"]),
        (["--set", "oops"], ["--set expects key=value"]),
        (["--lr", "-1"], ["lr must be a number in (0, inf)"]),
        (["--hessian-parts", "0"], ["hessian_parts must be an integer >= 1 or 'auto', got 0"]),
        (
            ["--hessian-parts", "three"],
            ["hessian_parts must be an integer >= 1 or 'auto'", "'three'"],
        ),
    ],
)
def test_compare_bad_input_exits_2_with_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], words: list[str]
) -> None:
    base = {"--dataset": "synthetic", "--model": "simplecnn", "--methods": "sgd", "--epochs": "1"}
    argv = ["compare", "--out", str(tmp_path / "cmp")]
    for flag, value in base.items():
        if flag not in flags:
            argv += [flag, value]
    code, out, err = run_cli(argv + flags, capsys)
    assert code == 2
    assert_one_line_error(err, *words)
    assert not (tmp_path / "cmp").exists()  # refused before anything ran


def test_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["compare", "--dataset", "synthetic", "--seeds", "a,b"], capsys)
    assert code == 2 and "--seeds: expected a comma-separated list" in err
    code, _, err = run_cli(["frobnicate"], capsys)
    assert code == 2 and "invalid choice" in err
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "compare" in out and "train" in out
    code, out, _ = run_cli(["compare", "--help"], capsys)
    assert code == 0 and "--track-every" in out and "(default: 50)" in out
    assert "--hessian-parts" in out and "auto: 4 when allowed" in " ".join(out.split())


@pytest.mark.parametrize(("text", "value"), [("auto", "auto"), ("3", 3), ("1", 1)])
def test_hessian_parts_flag_reads_auto_or_an_integer(text: str, value: object) -> None:
    argv = ["compare", "--dataset", "synthetic", "--model", "simplecnn", "--methods", "eigen-sam"]
    args = cli.build_parser().parse_args([*argv, "--epochs", "1", "--hessian-parts", text])
    assert cli._config_overrides(args, cli.COMPARE_FLAGS) == {"hessian_parts": value}


def test_compare_writes_table_and_plot_and_skips_finished_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "cmp"
    argv = [
        "compare",
        *TINY_FLAGS,
        "--methods",
        "sgd,eigen-sam",
        "--seeds",
        "1,2",
        "--epochs",
        "1",
        "--eig-interval",
        "1",
        "--out",
        str(out_dir),
    ]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    table = (out_dir / "comparison.md").read_text()
    printed, wrote = out.split("wrote ")
    assert printed in table
    assert wrote == f"{out_dir / 'comparison.md'} and {out_dir / 'comparison.png'}\n"
    assert "[4/4] eigen-sam seed 2: trained in" in err
    assert "| sgd | 2 |" in out and "| eigen-sam | 2 |" in out
    assert "final λ₁" in out and "mean Align(ε, v₁)" in out and " ± " in out
    assert "sgd: no perturbation is applied" in out
    assert (out_dir / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("sgd-seed1", "sgd-seed2", "eigen-sam-seed1", "eigen-sam-seed2"):
        summary = json.loads((out_dir / name / "summary.json").read_text())
        assert summary["final_lambda1"] > 0

    # Finished runs are reused: nothing is trained again.
    def refuse(self: Trainer, on_step: object = None) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Trainer, "run", refuse)
    code, out2, err = run_cli(argv, capsys)
    assert code == 0, err
    assert out2 == out and "[1/4] sgd seed 1: already finished" in err

    # A changed configuration is refused, naming the field.
    code, _, err = run_cli([*argv, "--lr", "0.5"], capsys)
    assert code == 2
    assert_one_line_error(err, "different configuration", "lr: 0.1 -> 0.5")


def test_compare_continues_an_interrupted_run(tmp_path: Path) -> None:
    out_dir = tmp_path / "cmp"
    kwargs = dict(train_subset=64, width=0.25, batch_size=32, track_every=0)
    plan = experiments.plan_comparison("synthetic", "simplecnn", ["sam"], [0], 2, out_dir, **kwargs)
    config = plan.configs["sam", 0]

    def stop(trainer: Trainer) -> None:
        if trainer.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config, data=plan.data).run(on_step=stop)
    assert tracking.load_checkpoint(config.run_dir / "checkpoint.pt")["step"] == 2
    table = experiments.compare("synthetic", "simplecnn", ["sam"], [0], 2, out_dir, **kwargs)
    assert "| sam | 1 |" in table
    summary = json.loads((config.run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_lambda1"] is None


def test_train_from_config_then_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--config", str(config), "--out", str(run)], capsys)
    assert code == 0, err
    assert "| sam | 1 |" in out and f"run folder: {run}" in out
    assert json.loads((run / "summary.json").read_text())["steps"] == 4

    # Resuming a finished run from its folder alone re-writes the same summary.
    code, _, err = run_cli(["train", "--resume", str(run)], capsys)
    assert code == 0, err
    # A second run into the same folder is refused, as is resuming with another config.
    code, _, err = run_cli(["train", "--config", str(config), "--out", str(run)], capsys)
    assert code == 2
    assert_one_line_error(err, "already holds a run", "--resume")
    code, _, err = run_cli(["train", "--resume", str(run), "--set", "rho=0.1"], capsys)
    assert code == 2
    assert_one_line_error(err, "rho: 0.05 -> 0.1")


def test_train_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train"], capsys)
    assert code == 2
    assert_one_line_error(err, "--config")
    code, _, err = run_cli(["train", "--config", str(tmp_path / "none.yaml")], capsys)
    assert code == 2
    assert_one_line_error(err, "none.yaml", "does not exist")
    code, _, err = run_cli(["train", "--resume", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line_error(err, "config.yaml")


def test_missing_dataset_is_reported_with_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "compare",
        "--dataset",
        "cifar10",
        "--model",
        "simplecnn",
        "--methods",
        "sgd",
        "--epochs",
        "1",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "cmp"),
    ]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line_error(err, "dataset 'cifar10' not found", "--download")


def test_diverged_and_interrupted_runs_exit_nonzero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    original = Trainer.run

    def failing(error: BaseException):
        def run(self: Trainer, on_step: object = None) -> object:
            def raise_at_3(trainer: Trainer) -> None:
                if trainer.step == 3:  # after the first epoch's checkpoint (step 2)
                    raise error

            return original(self, raise_at_3)

        return run

    monkeypatch.setattr(Trainer, "run", failing(FloatingPointError("non-finite loss nan")))
    argv = ["train", "--config", str(config), "--out", str(tmp_path / "a")]
    code, _, err = run_cli(argv, capsys)
    assert code == 1
    assert_one_line_error(err, "non-finite loss nan", "last checkpoint (step 2)")
    monkeypatch.setattr(Trainer, "run", failing(KeyboardInterrupt()))
    code, _, err = run_cli(["train", "--config", str(config), "--out", str(tmp_path / "b")], capsys)
    assert code == 130
    assert_one_line_error(err, "interrupted", f"eigensam train --resume {tmp_path / 'b'}")
