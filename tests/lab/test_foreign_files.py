"""Checkpoints and config files from elsewhere: truncated or foreign checkpoints, YAML configs
with unknown keys, wrong types or broken syntax, and run folders of another configuration given
to ``--resume``. Each is one ``eigensam: error:`` line naming the file and the problem (exit 2),
and nothing on disk is changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from eigensam import cli
from eigensam.lab.engine import run_folder as tracking

TINY_YAML = """\
dataset: synthetic
train_subset: 64
model: simplecnn
width: 0.25
method: sam
epochs: 1
batch_size: 32
track_every: 0
"""


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_refused(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eigensam: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    (root / "tiny.yaml").write_text(TINY_YAML)
    assert cli.main(["train", "--config", str(root / "tiny.yaml"), "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture
def run(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_truncated_checkpoint(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = run / tracking.CHECKPOINT_FILE
    checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
    before = contents(run)
    for argv in (["train", "--resume", run], ["spectrum", run, "--data-subset", "32"]):
        code, err = run_cli(argv, capsys)
        assert_refused(code, err, str(checkpoint), "cannot be read", "truncated")
        assert contents(run) == before


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda f: f.write_bytes(b"not a checkpoint at all"), ["cannot be read"]),
        (lambda f: f.write_text("dataset: synthetic\n"), ["cannot be read"]),
        (
            lambda f: torch.save({"weight": torch.ones(2)}, f),
            ["not an eigensam training checkpoint", "lacks ['config', 'step'", "['weight']"],
        ),
        (lambda f: torch.save([1, 2, 3], f), ["not an eigensam training checkpoint", "list"]),
    ],
)
def test_foreign_checkpoint(make, words, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    file = tmp_path / "model.pt"
    make(file)
    code, err = run_cli(["spectrum", file, "--data-subset", "32"], capsys)
    assert_refused(code, err, str(file), *words)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_checkpoint_with_an_invalid_configuration(run: Path, capsys) -> None:
    checkpoint = run / tracking.CHECKPOINT_FILE
    state = tracking.load_checkpoint(checkpoint)
    state["config"]["method"] = "adam-sam"
    torch.save(state, checkpoint)
    before = contents(run)
    code, err = run_cli(["spectrum", run, "--data-subset", "32"], capsys)
    assert_refused(code, err, str(checkpoint), "invalid configuration", "adam-sam")
    assert contents(run) == before


def test_checkpoint_weights_that_do_not_fit(run: Path, capsys) -> None:
    checkpoint = run / tracking.CHECKPOINT_FILE
    state = tracking.load_checkpoint(checkpoint)
    state["model"] = {k: v[..., :1] for k, v in state["model"].items()}
    torch.save(state, checkpoint)
    before = contents(run)
    code, err = run_cli(["train", "--resume", run], capsys)
    assert_refused(code, err, str(checkpoint), "does not fit this run's model")
    code, err = run_cli(["spectrum", run, "--data-subset", "32"], capsys)
    assert_refused(code, err, str(checkpoint), "weights do not fit the model")
    assert contents(run) == before


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (TINY_YAML + "modle: simplecnn\n", ["unknown config keys ['modle']", "valid keys"]),
        (TINY_YAML.replace("epochs: 1", "epochs: two"), ["epochs must be an integer", "'two'"]),
        (TINY_YAML.replace("width: 0.25", "width: [0.25"), ["not valid YAML at line"]),
        (TINY_YAML.replace("method: sam", "method: 3"), ["method must be one of"]),
        ("- a list\n", ["expected a mapping", "list"]),
    ],
)
def test_bad_config_file(text, words, tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    code, err = run_cli(["train", "--config", config, "--out", tmp_path / "run"], capsys)
    assert_refused(code, err, f"config file {config}", *words)
    assert not (tmp_path / "run").exists()


def test_bad_override_is_blamed_on_the_override(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(TINY_YAML)
    argv = ["train", "--config", config, "--out", tmp_path / "run", "--set", "rho=-1"]
    code, err = run_cli(argv, capsys)
    assert_refused(code, err, f"config file {config} with the overrides", "'rho': -1", "rho must")


def test_resume_with_another_configuration(run: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(TINY_YAML.replace("method: sam", "method: eigen-sam"))
    before = contents(run)
    code, err = run_cli(["train", "--config", other, "--resume", run], capsys)
    assert_refused(code, err, str(run), "different configuration", "method: 'sam' -> 'eigen-sam'")
    assert contents(run) == before


def test_resume_a_folder_whose_checkpoint_is_from_another_run(
    run: Path, tmp_path: Path, capsys
) -> None:
    """A run folder whose config.yaml and checkpoint.pt come from different runs (copied
    together by hand): the checkpoint is checked against the configuration too."""
    (run / tracking.CONFIG_FILE).write_text(
        TINY_YAML.replace("width: 0.25", "width: 0.5") + f"out_dir: {tmp_path}\n"
    )
    before = contents(run)
    code, err = run_cli(["train", "--resume", run], capsys)
    checkpoint = run / tracking.CHECKPOINT_FILE
    assert_refused(code, err, f"checkpoint {checkpoint}", "different configuration", "width")
    assert contents(run) == before
