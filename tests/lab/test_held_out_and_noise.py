"""The held-out evaluation set (every image a run never trains on) and symmetric label noise:
disjointness, coverage, determinism, clean evaluation labels and bad input (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_data import recover_index, write_idx_dataset

from eigensam.cli import main
from eigensam.lab.engine.config import TrainConfig
from eigensam.lab.workloads.datasets import (
    flip_labels,
    held_out_indices,
    load_dataset,
    load_held_out,
)

NUM_TRAIN, NUM_TEST = 50, 20


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    write_idx_dataset(tmp_path / "MNIST" / "raw", NUM_TRAIN, NUM_TEST, compress=False)
    return tmp_path


def test_held_out_is_disjoint_from_the_subset_and_covers_every_unused_image(mnist_dir):
    splits = load_dataset("mnist", mnist_dir, train_subset=30, val_fraction=0.2, seed=3)
    used = set(recover_index(splits.train.images)) | set(recover_index(splits.val.images))
    held = load_held_out("mnist", mnist_dir, train_subset=30, seed=3)
    assert len(held) == NUM_TRAIN - 30 + NUM_TEST
    unused = recover_index(held.images[: NUM_TRAIN - 30])
    assert not set(unused) & used  # disjoint from the training subset (and its validation)
    assert set(unused) | used == set(range(NUM_TRAIN))  # every unused image is held out
    assert len(set(unused)) == len(unused)  # each once
    assert recover_index(held.images[NUM_TRAIN - 30 :]) == list(range(NUM_TEST))  # the test set
    assert held.labels.tolist() == [i % 10 for i in unused + list(range(NUM_TEST))]


def test_held_out_is_deterministic_from_the_seed(mnist_dir):
    first = held_out_indices(NUM_TRAIN, 30, seed=3)
    assert torch.equal(first, held_out_indices(NUM_TRAIN, 30, seed=3))
    assert not torch.equal(first, held_out_indices(NUM_TRAIN, 30, seed=4))
    assert torch.equal(first, first.sort().values)
    again = load_held_out("mnist", mnist_dir, train_subset=30, seed=3)
    assert torch.equal(again.images, load_held_out("mnist", mnist_dir, 30, 3).images)
    assert len(held_out_indices(NUM_TRAIN, None, seed=0)) == 0
    assert len(load_held_out("mnist", mnist_dir)) == NUM_TEST  # whole training set used


def test_a_subset_larger_than_the_dataset_is_refused(mnist_dir):
    with pytest.raises(ValueError, match=r"train_subset must be an integer in \[1, 50\], got 51"):
        load_held_out("mnist", mnist_dir, train_subset=51)
    with pytest.raises(ValueError, match="train_subset"):
        held_out_indices(NUM_TRAIN, 0, seed=0)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.4, 0.9])
def test_label_noise_flips_exactly_the_requested_fraction(fraction):
    labels = torch.arange(1000) % 10
    noisy = flip_labels(labels, fraction, 10, seed=5)
    changed = int((noisy != labels).sum())
    assert changed == round(fraction * 1000)
    assert noisy.min() >= 0 and noisy.max() <= 9
    assert torch.equal(labels, torch.arange(1000) % 10)  # the input is not modified
    assert torch.equal(noisy, flip_labels(labels, fraction, 10, seed=5))
    if fraction:
        assert not torch.equal(noisy, flip_labels(labels, fraction, 10, seed=6))
        # Symmetric: the new classes spread over all the other classes.
        shifts = (noisy - labels)[noisy != labels] % 10
        assert set(shifts.tolist()) == set(range(1, 10))


def test_label_noise_leaves_the_evaluation_labels_clean(mnist_dir):
    clean = load_dataset("mnist", mnist_dir, train_subset=40, val_fraction=0.25, seed=2)
    noisy = load_dataset(
        "mnist", mnist_dir, train_subset=40, val_fraction=0.25, seed=2, label_noise=0.4
    )
    assert torch.equal(noisy.train.images, clean.train.images)
    assert int((noisy.train.labels != clean.train.labels).sum()) == round(0.4 * 30)
    assert torch.equal(noisy.val.labels, clean.val.labels)  # type: ignore[union-attr]
    assert torch.equal(noisy.test.labels, clean.test.labels)
    held = load_held_out("mnist", mnist_dir, train_subset=40, seed=2)
    assert held.labels.tolist() == [i % 10 for i in recover_index(held.images[:10])] + [
        i % 10 for i in range(NUM_TEST)
    ]


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, True, "0.2"])
def test_a_noise_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match=r"label_noise must be .*\[0, 1\)"):
        flip_labels(torch.zeros(4, dtype=torch.long), fraction, 10, seed=0)  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError), match="label_noise"):
        TrainConfig(label_noise=fraction)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--label-noise", "1.0", "label_noise"),
        ("--label-noise", "-0.2", "label_noise"),
        ("--train-subset", "70000", "train_subset"),
    ],
)
def test_cli_bad_noise_or_subset_is_one_error_line(tmp_path, capsys, option, value, message):
    args = ["compare", "--dataset", "fashion-mnist", "--model", "simplecnn", "--methods", "sgd"]
    args += ["--epochs", "1", "--out", str(tmp_path / "c"), option, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
