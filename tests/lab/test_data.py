"""Tests for eigensam.lab.workloads.datasets: readers, lookup, splits, augmentation and the
batch loader."""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from eigensam.lab.workloads import datasets as data
from eigensam.lab.workloads.datasets import (
    DATASETS,
    BatchLoader,
    TensorData,
    augment,
    candidate_dirs,
    default_augmentation,
    default_data_dir,
    load_dataset,
    make_synthetic,
    read_cifar_batch,
    read_idx,
    read_svhn_mat,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------
# Writers for tiny files in torchvision's formats


def write_idx(path: Path, array: np.ndarray, code: int = 0x08, compress: bool = False) -> None:
    """Write ``array`` as an IDX file: magic (0, 0, code, ndim), big-endian sizes, data."""
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def write_idx_dataset(folder: Path, num_train: int, num_test: int, compress: bool) -> None:
    """IDX train/t10k files where every pixel of image i equals i and label i is i % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
        write_idx(
            folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress=compress
        )


def cifar_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def recover_index(images: torch.Tensor) -> list[int]:
    """Invert the MNIST normalization of :func:`write_idx_dataset` images to their index."""
    raw = (images[:, 0, 0, 0] * 0.3081 + 0.1307) * 255
    return [int(v) for v in raw.round()]


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    write_idx_dataset(tmp_path / "MNIST" / "raw", num_train=50, num_test=20, compress=True)
    return tmp_path


# --------------------------------------------------------------------------------------------
# Readers


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EIGENSAM_DATA", str(tmp_path))
    labels = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    splits = load_dataset("fashion-mnist")
    assert splits.train.images.shape == (60000, 1, 28, 28)
    assert splits.test.images.shape == (10000, 1, 28, 28)
    assert splits.train.images.dtype == torch.float32
    assert splits.train.labels.dtype == torch.int64
    for part in (splits.train, splits.test):
        assert part.labels.min() == 0 and part.labels.max() == 9
    assert torch.bincount(splits.train.labels).tolist() == [6000] * 10
    assert abs(splits.train.images.mean().item()) < 0.01
    assert abs(splits.train.images.std().item() - 1) < 0.01
    assert splits.val is None
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("code", [0x08, 0x0C, 0x0D])
def test_read_idx_round_trip(tmp_path: Path, compress: bool, code: int) -> None:
    array = np.arange(24).reshape(2, 3, 4)
    path = tmp_path / "file-idx3-ubyte"
    write_idx(path, array, code=code, compress=compress)
    out = read_idx(path)
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)
    write_idx(path, np.zeros((4, 2), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="bytes"):
        read_idx(path)


def test_load_mnist_from_torchvision_layout(mnist_dir: Path) -> None:
    splits = load_dataset("mnist", data_dir=mnist_dir)
    assert splits.train.images.shape == (50, 1, 28, 28)
    assert splits.test.images.shape == (20, 1, 28, 28)
    assert splits.train.labels.tolist() == [i % 10 for i in range(50)]
    expected = (7 / 255 - 0.1307) / 0.3081
    assert torch.allclose(splits.train.images[7], torch.full((1, 28, 28), expected))


def test_read_cifar10_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows[name] = cifar_rows(4, rng)
        labels = rng.integers(0, 10, size=4).tolist()
        write_pickle(folder / name, {"batch_label": name, "data": rows[name], "labels": labels})
    splits = load_dataset("cifar10", data_dir=tmp_path)
    assert splits.train.images.shape == (20, 3, 32, 32)
    assert splits.test.images.shape == (4, 3, 32, 32)
    # Row layout: 1024 red, 1024 green, 1024 blue values, each a 32×32 image in row order.
    first = rows["data_batch_1"][0]
    pixel = first[[0 * 1024 + 5 * 32 + 7, 1 * 1024 + 5 * 32 + 7, 2 * 1024 + 5 * 32 + 7]]
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    expected = (torch.tensor(pixel / 255.0, dtype=torch.float32) - mean) / std
    assert torch.allclose(splits.train.images[0, :, 5, 7], expected, atol=1e-6)


def test_read_cifar100_fine_labels_and_bytes_keys(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 6), ("test", 3)):
        batch = {
            b"data": cifar_rows(n, rng),
            b"fine_labels": [99, 0, 42, 7, 8, 9][:n],
            b"coarse_labels": [1] * n,
        }
        write_pickle(folder / name, batch)
    splits = load_dataset("cifar100", data_dir=tmp_path)
    assert splits.num_classes == 100
    assert splits.train.labels.tolist() == [99, 0, 42, 7, 8, 9]
    assert splits.test.images.shape == (3, 3, 32, 32)


def test_cifar_reader_refuses_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil"
    write_pickle(path, {"data": OrderedDict(), "labels": []})
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_cifar_batch(path)


def test_read_svhn_mat(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [10], [9]], dtype=np.uint8)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        scipy_io.savemat(tmp_path / name, {"X": x, "y": y})
    images, labels = read_svhn_mat(tmp_path / "train_32x32.mat")
    assert images.shape == (5, 3, 32, 32) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 0, 9]
    assert images[3, 2, 10, 20] == x[10, 20, 2, 3]  # X is H×W×C×N
    splits = load_dataset("svhn", data_dir=tmp_path)
    assert splits.train.images.shape == (5, 3, 32, 32)


# --------------------------------------------------------------------------------------------
# Lookup and errors


def test_default_data_dir_and_candidates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EIGENSAM_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    dirs = candidate_dirs("fashion-mnist")
    assert tmp_path / "FashionMNIST" / "raw" in dirs and tmp_path in dirs
    assert dirs[-1] == Path("/usr/share/datasets/fashion-mnist")
    monkeypatch.delenv("EIGENSAM_DATA")
    assert default_data_dir() == Path.home() / ".cache" / "eigensam" / "data"


def test_missing_dataset_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert "cifar10" in message and str(tmp_path / "cifar-10-batches-py") in message
    assert "eigensam[vision]" in message and "--download" in message

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    with pytest.raises(FileNotFoundError, match="torchvision is not installed"):
        load_dataset("svhn", data_dir=tmp_path, download=True)

    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="cifar10"):
        default_augmentation("imagenet")


# --------------------------------------------------------------------------------------------
# Subsets and validation splits


def test_subset_and_validation_split(mnist_dir: Path) -> None:
    splits = load_dataset("mnist", data_dir=mnist_dir, train_subset=30, val_fraction=0.2, seed=3)
    assert splits.val is not None
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 20)
    train_ids, val_ids = recover_index(splits.train.images), recover_index(splits.val.images)
    assert not set(train_ids) & set(val_ids)
    assert len(set(train_ids) | set(val_ids)) == 30
    assert splits.train.labels.tolist() == [i % 10 for i in train_ids]

    again = load_dataset("mnist", data_dir=mnist_dir, train_subset=30, val_fraction=0.2, seed=3)
    assert torch.equal(again.train.images, splits.train.images)
    assert torch.equal(again.val.images, splits.val.images)  # type: ignore[union-attr]
    other = load_dataset("mnist", data_dir=mnist_dir, train_subset=30, val_fraction=0.2, seed=4)
    assert recover_index(other.train.images) != train_ids

    full = load_dataset("mnist", data_dir=mnist_dir, val_fraction=0.1)
    assert (len(full.train), len(full.val)) == (45, 5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"train_subset": 0}, "train_subset"),
        ({"train_subset": 51}, "train_subset"),
        ({"train_subset": 2.5}, "train_subset"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"train_subset": 3, "val_fraction": 0.1}, "val_fraction"),
    ],
)
def test_bad_split_arguments(mnist_dir: Path, kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        load_dataset("mnist", data_dir=mnist_dir, **kwargs)


def test_synthetic_data() -> None:
    splits = make_synthetic(64, 32, num_classes=4, channels=3, size=16, seed=5)
    assert splits.train.images.shape == (64, 3, 16, 16)
    assert splits.test.images.shape == (32, 3, 16, 16)
    assert torch.bincount(splits.train.labels).tolist() == [16] * 4
    same = make_synthetic(64, 32, num_classes=4, channels=3, size=16, seed=5)
    assert torch.equal(same.train.images, splits.train.images)

    default = load_dataset("synthetic", train_subset=100, val_fraction=0.2)
    assert default.val is not None
    assert (len(default.train), len(default.val), len(default.test)) == (80, 20, 256)
    assert (default.in_channels, default.image_size, default.name) == (1, 28, "synthetic")
    assert len(load_dataset("synthetic").train) == 512
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(10, 10, num_classes=1)


def test_synthetic_data_is_learnable() -> None:
    splits = make_synthetic(256, 128, seed=0)
    x, y = splits.train.images.flatten(1), splits.train.labels
    model = torch.nn.Linear(x.shape[1], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    accuracy = (model(splits.test.images.flatten(1)).argmax(1) == splits.test.labels).float()
    assert accuracy.mean() > 0.9


# --------------------------------------------------------------------------------------------
# Augmentation


def test_default_augmentation() -> None:
    assert default_augmentation("cifar10") == {"flip": True, "pad": 4}
    assert default_augmentation("cifar100") == {"flip": True, "pad": 4}
    assert default_augmentation("fashion-mnist") == {"flip": True, "pad": 4}
    assert default_augmentation("svhn") == {"flip": False, "pad": 4}
    assert default_augmentation("mnist") == {"flip": False, "pad": 4}
    assert set(DATASETS) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "svhn"}


def test_augment_is_deterministic_and_preserves_shape() -> None:
    images = torch.randn(16, 3, 8, 8)
    a = augment(images, torch.Generator().manual_seed(0), flip=True, pad=2)
    b = augment(images, torch.Generator().manual_seed(0), flip=True, pad=2)
    c = augment(images, torch.Generator().manual_seed(1), flip=True, pad=2)
    assert a.shape == images.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment(images, torch.Generator(), flip=False, pad=0), images)


def test_augment_flip_mirrors_samples() -> None:
    images = torch.randn(64, 1, 5, 5)
    out = augment(images, torch.Generator().manual_seed(0), flip=True, pad=0)
    flipped = [torch.equal(o, x.flip(2)) for o, x in zip(out, images, strict=True)]
    kept = [torch.equal(o, x) for o, x in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


def test_augment_crop_is_a_window_of_the_padded_image() -> None:
    pad, images = 2, torch.randn(32, 2, 6, 6)
    out = augment(images, torch.Generator().manual_seed(0), flip=False, pad=pad)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    offsets = set()
    for i in range(len(images)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 6])
        ]
        assert matches
        offsets.update(matches)
    assert len(offsets) > 5


def test_augment_bad_arguments() -> None:
    with pytest.raises(ValueError, match="pad"):
        augment(torch.zeros(1, 1, 4, 4), torch.Generator(), flip=False, pad=-1)
    with pytest.raises(ValueError, match="images"):
        augment(torch.zeros(4, 4), torch.Generator(), flip=False)


# --------------------------------------------------------------------------------------------
# Batch loader


def indexed_data(n: int) -> TensorData:
    """Samples whose label is their index, so batches reveal which samples they hold."""
    return TensorData(torch.randn(n, 1, 6, 6), torch.arange(n))


def collect(loader: BatchLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_covers_each_sample_once() -> None:
    loader = BatchLoader(indexed_data(103), 10, True, None, torch.Generator().manual_seed(0))
    assert len(loader) == 11
    first = torch.cat([y for _, y in loader])
    second = torch.cat([y for _, y in loader])
    assert first.sort().values.tolist() == list(range(103))
    assert second.sort().values.tolist() == list(range(103))
    assert not torch.equal(first, second)

    ordered = BatchLoader(indexed_data(103), 10, False, None, torch.Generator(), drop_last=True)
    assert len(ordered) == 10
    assert torch.cat([y for _, y in ordered]).tolist() == list(range(100))


def test_loader_uses_only_its_generator() -> None:
    data, aug, batches = indexed_data(40), {"flip": True, "pad": 2}, []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        loader = BatchLoader(data, 8, True, aug, torch.Generator().manual_seed(7))
        batches.append(collect(loader))
    for (xa, ya), (xb, yb) in zip(*batches, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_state_restores_epochs_and_mid_epoch_position() -> None:
    data, aug = indexed_data(50), {"flip": True, "pad": 2}
    loader = BatchLoader(data, 8, True, aug, torch.Generator().manual_seed(0))
    start = loader.state_dict()
    epoch1 = collect(loader)
    after1 = loader.state_dict()
    assert after1["batches_done"] == 0
    epoch2 = collect(loader)

    loader.load_state_dict(start)
    for (xa, ya), (xb, yb) in zip(collect(loader), epoch1, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)

    resumed = BatchLoader(data, 8, True, aug, torch.Generator().manual_seed(123))
    resumed.load_state_dict(after1)
    iterator = iter(resumed)
    for _ in range(3):
        next(iterator)
    middle = resumed.state_dict()
    assert middle["batches_done"] == 3

    fresh = BatchLoader(data, 8, True, aug, torch.Generator())
    fresh.load_state_dict(middle)
    rest = collect(fresh)
    assert len(rest) == len(epoch2) - 3
    for (xa, ya), (xb, yb) in zip(rest, epoch2[3:], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(indexed_data(5), 0, True, None, torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(indexed_data(5), 6, True, None, torch.Generator(), drop_last=True)
    with pytest.raises(ValueError, match="augment"):
        BatchLoader(indexed_data(5), 2, True, {"rotate": 1}, torch.Generator())
