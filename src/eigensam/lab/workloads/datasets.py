"""Image classification datasets as in-memory tensors, tensor augmentation and a batch loader.

Files are read from torchvision's on-disk formats by the readers below (IDX for MNIST and
Fashion-MNIST, python pickle batches for CIFAR-10/100, ``.mat`` for SVHN), so torchvision is only
imported, lazily, to download missing files.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DistributedSampler

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn")
SYNTHETIC = "synthetic"
DATA_ENV_VAR = "EIGENSAM_DATA"
SYSTEM_DIRS = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),  # Debian: dataset-fashion-mnist
    "mnist": Path("/usr/share/datasets/mnist"),
}

PathLike = str | os.PathLike[str]
Arrays = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------
# Containers


@dataclass
class TensorData:
    """Images (float32, N×C×H×W, normalized) and their int64 class labels (N)."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be N×C×H×W, got shape {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class DataSplits:
    """Train, optional validation and test splits of one dataset, with its metadata."""

    train: TensorData
    val: TensorData | None
    test: TensorData
    num_classes: int
    in_channels: int
    image_size: int
    name: str


# --------------------------------------------------------------------------------------------
# Readers for torchvision's on-disk formats

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed (detected from its first bytes).

    Layout: two zero bytes, a dtype code, the number of dimensions k, k big-endian int32 sizes,
    then the values in C order. Returns an array of shape ``(size_1, ..., size_k)``.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()})")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = offset + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header says {expected} bytes, file has {len(raw)}")
    values = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)
    return values.astype(dtype.newbyteorder("="))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: CIFAR batches need nothing else."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def read_cifar_batch(path: PathLike, label_key: str = "labels") -> Arrays:
    """Read one CIFAR python pickle batch.

    Returns uint8 images N×3×32×32 (the ``data`` rows are 3072 bytes: R, G, B planes of 32×32)
    and int64 labels from ``label_key`` ("labels" for CIFAR-10, "fine_labels" for CIFAR-100).
    """
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="latin1").load()
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: CIFAR batch lacks 'data' or {label_key!r} (has {list(batch)})")
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: {images.shape[0]} images but labels of shape {labels.shape}")
    return images, labels


def read_svhn_mat(path: PathLike) -> Arrays:
    """Read an SVHN ``*_32x32.mat`` file: uint8 images N×3×32×32 and int64 labels (10 -> 0).

    The file stores ``X`` as H×W×C×N and ``y`` as N×1 with digit 0 labelled 10.
    """
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise ImportError("reading SVHN needs scipy: pip install 'eigensam[vision]'") from exc
    mat = loadmat(str(path))
    images = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1))
    labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    labels[labels == 10] = 0
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: {images.shape[0]} images but labels of shape {labels.shape}")
    return images, labels


def _idx_file(folder: Path, name: str) -> Path | None:
    """Path of ``name`` or ``name.gz`` in ``folder``, if either exists."""
    return next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)


def _read_idx_split(folder: Path, prefix: str) -> Arrays:
    paths = [
        _idx_file(folder, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]
    if paths[0] is None or paths[1] is None:
        raise FileNotFoundError(f"{folder}: missing {prefix}-images/labels IDX files")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape}")
    return images[:, None].astype(np.uint8), labels.astype(np.int64)


def _read_idx_folder(folder: Path) -> tuple[Arrays, Arrays]:
    return _read_idx_split(folder, "train"), _read_idx_split(folder, "t10k")


def _read_cifar10_folder(folder: Path) -> tuple[Arrays, Arrays]:
    batches = [read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    train = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    return train, read_cifar_batch(folder / "test_batch")


def _read_cifar100_folder(folder: Path) -> tuple[Arrays, Arrays]:
    return (
        read_cifar_batch(folder / "train", "fine_labels"),
        read_cifar_batch(folder / "test", "fine_labels"),
    )


def _read_svhn_folder(folder: Path) -> tuple[Arrays, Arrays]:
    return read_svhn_mat(folder / "train_32x32.mat"), read_svhn_mat(folder / "test_32x32.mat")


# --------------------------------------------------------------------------------------------
# Dataset specifications and file lookup

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_VISION_HINT = (
    "install torchvision (pip install 'eigensam[vision]') and pass download=True (CLI: --download)"
)


@dataclass(frozen=True)
class _Spec:
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files: tuple[str, ...]
    idx: bool  # IDX files may also be gzip-compressed (name + ".gz")
    subdirs: tuple[str, ...]  # candidate folders relative to data_dir; "" is data_dir itself
    read: Callable[[Path], tuple[Arrays, Arrays]]
    torchvision_class: str
    hint: str


_SPECS = {
    "fashion-mnist": _Spec(
        num_classes=10,
        in_channels=1,
        image_size=28,
        mean=(0.2860,),
        std=(0.3530,),
        files=_IDX_FILES,
        idx=True,
        subdirs=("fashion-mnist", "FashionMNIST/raw", "FashionMNIST", ""),
        read=_read_idx_folder,
        torchvision_class="FashionMNIST",
        hint=f"on Debian/Ubuntu run `apt-get install dataset-fashion-mnist`, or {_VISION_HINT}",
    ),
    "mnist": _Spec(
        num_classes=10,
        in_channels=1,
        image_size=28,
        mean=(0.1307,),
        std=(0.3081,),
        files=_IDX_FILES,
        idx=True,
        subdirs=("mnist", "MNIST/raw", "MNIST", ""),
        read=_read_idx_folder,
        torchvision_class="MNIST",
        hint=_VISION_HINT,
    ),
    "cifar10": _Spec(
        num_classes=10,
        in_channels=3,
        image_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        files=(*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
        idx=False,
        subdirs=("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10", ""),
        read=_read_cifar10_folder,
        torchvision_class="CIFAR10",
        hint=_VISION_HINT,
    ),
    "cifar100": _Spec(
        num_classes=100,
        in_channels=3,
        image_size=32,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        files=("train", "test"),
        idx=False,
        subdirs=("cifar-100-python", "cifar100/cifar-100-python", "cifar100", ""),
        read=_read_cifar100_folder,
        torchvision_class="CIFAR100",
        hint=_VISION_HINT,
    ),
    "svhn": _Spec(
        num_classes=10,
        in_channels=3,
        image_size=32,
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        files=("train_32x32.mat", "test_32x32.mat"),
        idx=False,
        subdirs=("svhn", "SVHN", ""),
        read=_read_svhn_folder,
        torchvision_class="SVHN",
        hint=_VISION_HINT,
    ),
}


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        valid = ", ".join((*DATASETS, SYNTHETIC))
        raise ValueError(f"dataset must be one of {valid}; got {name!r}")
    return _SPECS[name]


def default_data_dir() -> Path:
    """``$EIGENSAM_DATA`` if set and non-empty, else ``~/.cache/eigensam/data``."""
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "eigensam" / "data"


def candidate_dirs(name: str, data_dir: PathLike | None = None) -> list[Path]:
    """Folders searched for ``name``, in order: data_dir subfolders, data_dir, system folder.

    Dataset-specific subfolders come before ``data_dir`` itself because MNIST and Fashion-MNIST
    use identical file names.
    """
    spec = _spec(name)
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    dirs = [root / sub if sub else root for sub in spec.subdirs]
    if name in SYSTEM_DIRS:
        dirs.append(SYSTEM_DIRS[name])
    return list(dict.fromkeys(dirs))


def _has_files(folder: Path, spec: _Spec) -> bool:
    if spec.idx:
        return all(_idx_file(folder, f) is not None for f in spec.files)
    return all((folder / f).is_file() for f in spec.files)


def _find(name: str, data_dir: PathLike | None) -> Path | None:
    spec = _spec(name)
    return next((d for d in candidate_dirs(name, data_dir) if _has_files(d, spec)), None)


def _missing_error(name: str, data_dir: PathLike | None, reason: str) -> FileNotFoundError:
    spec = _spec(name)
    searched = "\n".join(f"  {d}" for d in candidate_dirs(name, data_dir))
    files = ", ".join(spec.files) + (" (each may be .gz)" if spec.idx else "")
    return FileNotFoundError(
        f"dataset {name!r} not found ({reason}). Searched:\n{searched}\n"
        f"Expected files: {files}.\n"
        f"To get it: {spec.hint}; or put the files in data_dir (or ${DATA_ENV_VAR})."
    )


def _download(name: str, data_dir: PathLike | None) -> None:
    """Download ``name`` with torchvision into the data root (torchvision's own layout)."""
    spec = _spec(name)
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    try:
        import torchvision.datasets as tv_datasets
    except ImportError as exc:
        raise _missing_error(name, data_dir, "torchvision is not installed") from exc
    dataset_class = getattr(tv_datasets, spec.torchvision_class)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            if name == "svhn":
                dataset_class(str(root), split="train" if train else "test", download=True)
            else:
                dataset_class(str(root), train=train, download=True)
    except Exception as exc:  # any network / disk / checksum failure
        raise _missing_error(name, data_dir, f"download failed: {exc}") from exc


def locate_dataset(name: str, data_dir: PathLike | None = None, download: bool = False) -> Path:
    """Folder holding all files of ``name``; downloads with torchvision if asked and missing."""
    folder = _find(name, data_dir)
    if folder is None and download:
        _download(name, data_dir)
        folder = _find(name, data_dir)
    if folder is None:
        reason = (
            "download finished but files are still missing"
            if download
            else "no folder holds all files"
        )
        raise _missing_error(name, data_dir, reason)
    return folder


# --------------------------------------------------------------------------------------------
# Loading, subsets and splits


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as an int if it is an integer in ``[low, high]``, else a ValueError."""
    bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
    error = ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise error
    if value < low or (high is not None and value > high):
        raise error
    return int(value)


def _subset_order(n: int, seed: int) -> Tensor:
    """The seeded permutation of ``range(n)`` whose first entries form a training subset."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def held_out_indices(n: int, train_subset: int | None, seed: int) -> Tensor:
    """Sorted indices of the ``n`` training images that the seeded ``train_subset`` of
    :func:`load_dataset` (same ``seed``) leaves unused: the entries of the seeded permutation
    after its first ``train_subset``; empty when the whole training set is used."""
    n = _check_int("n", n, 1)
    if train_subset is None:
        return torch.empty(0, dtype=torch.long)
    size = _check_int("train_subset", train_subset, 1, n)
    return _subset_order(n, seed)[size:].sort().values


def flip_labels(labels: Tensor, fraction: float, num_classes: int, seed: int) -> Tensor:
    """Symmetric label noise: a copy of ``labels`` in which exactly ``round(fraction · N)``
    seeded positions get a different class, drawn uniformly from the other
    ``num_classes − 1``; ``fraction`` in [0, 1)."""
    fraction = check_label_noise(fraction)
    num_classes = _check_int("num_classes", num_classes, 2)
    generator = torch.Generator().manual_seed(seed)
    count = round(fraction * labels.shape[0])
    chosen = torch.randperm(labels.shape[0], generator=generator)[:count]
    shift = torch.randint(1, num_classes, (count,), generator=generator)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return noisy


def check_label_noise(fraction: object) -> float:
    """``fraction`` when it is a number in [0, 1) (the share of training labels flipped)."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise ValueError(f"label_noise must be a fraction in [0, 1), got {fraction!r}")
    if not 0 <= fraction < 1:
        raise ValueError(f"label_noise must be a fraction in [0, 1), got {fraction!r}")
    return float(fraction)


def _split_indices(
    n: int, train_subset: int | None, val_fraction: float, seed: int
) -> tuple[Tensor | None, Tensor | None]:
    """Seeded (train, val) index sets, sorted; ``None`` for train means all ``n`` samples.

    A random permutation of ``range(n)`` is drawn; its first ``train_subset`` entries form the
    subset, of which the first ``round(val_fraction · train_subset)`` go to validation.
    """
    if train_subset is None and val_fraction == 0:
        return None, None
    size = n if train_subset is None else train_subset
    chosen = _subset_order(n, seed)[:size]
    num_val = round(val_fraction * size)
    if val_fraction > 0 and not 1 <= num_val < size:
        raise ValueError(
            f"val_fraction={val_fraction} of {size} training samples leaves an empty "
            "train or validation split; change val_fraction or train_subset"
        )
    if num_val == 0:
        return chosen.sort().values, None
    return chosen[num_val:].sort().values, chosen[:num_val].sort().values


def _normalize(images: np.ndarray, labels: np.ndarray, spec: _Spec) -> TensorData:
    """``(x / 255 - mean_c) / std_c`` per channel c, as float32."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    x.sub_(mean).div_(std)
    return TensorData(x, torch.from_numpy(np.ascontiguousarray(labels)).to(torch.int64))


def load_dataset(
    name: str,
    data_dir: PathLike | None = None,
    train_subset: int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    download: bool = False,
    label_noise: float = 0.0,
) -> DataSplits:
    """Load ``name`` as normalized in-memory tensors.

    ``train_subset`` keeps a seeded random subset of the training set and ``val_fraction``
    moves a seeded fraction of the (sub)set into ``val``. ``label_noise`` flips that fraction of
    the training split's labels (:func:`flip_labels`, seeded by ``seed``); validation and test
    labels stay clean. For ``"synthetic"`` the training set size is ``train_subset`` (default
    512, test 256) and the data are fixed (generation seed 0); ``seed`` only drives the
    validation split and the label noise.
    """
    if not (isinstance(val_fraction, int | float) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    check_label_noise(label_noise)
    data = _load_splits(name, data_dir, train_subset, val_fraction, seed, download)
    if label_noise:
        labels = flip_labels(data.train.labels, label_noise, data.num_classes, seed)
        data.train = TensorData(data.train.images, labels)
    return data


def load_held_out(
    name: str,
    data_dir: PathLike | None = None,
    train_subset: int | None = None,
    seed: int = 0,
    download: bool = False,
) -> TensorData:
    """Every image of ``name`` that a run on the seeded ``train_subset`` (same ``seed``) never
    trains on, with its true label: the unused training images (:func:`held_out_indices`)
    followed by the test set. Disjoint from the training subset and from its validation
    split; the whole test set when the whole training set is used (or for ``"synthetic"``)."""
    if name == SYNTHETIC:
        return load_dataset(name, data_dir, train_subset, seed=seed).test
    spec = _spec(name)
    (train_x, train_y), (test_x, test_y) = spec.read(locate_dataset(name, data_dir, download))
    unused = held_out_indices(len(train_y), train_subset, seed).numpy()
    images = np.concatenate([train_x[unused], test_x])
    labels = np.concatenate([train_y[unused], test_y])
    return _normalize(images, labels, spec)


def _load_splits(
    name: str,
    data_dir: PathLike | None,
    train_subset: int | None,
    val_fraction: float,
    seed: int,
    download: bool,
) -> DataSplits:
    if name == SYNTHETIC:
        size = 512 if train_subset is None else _check_int("train_subset", train_subset, 1)
        data = make_synthetic(size, 256)
        _, val_idx = _split_indices(size, None, val_fraction, seed)
        if val_idx is None:
            return data
        keep = torch.ones(size, dtype=torch.bool)
        keep[val_idx] = False
        full = data.train
        data.train = TensorData(full.images[keep], full.labels[keep])
        data.val = TensorData(full.images[val_idx], full.labels[val_idx])
        return data

    spec = _spec(name)
    (train_x, train_y), (test_x, test_y) = spec.read(locate_dataset(name, data_dir, download))
    if train_subset is not None:
        train_subset = _check_int("train_subset", train_subset, 1, len(train_y))
    train_idx, val_idx = _split_indices(len(train_y), train_subset, val_fraction, seed)
    val = None
    if val_idx is not None:
        val = _normalize(train_x[val_idx.numpy()], train_y[val_idx.numpy()], spec)
    if train_idx is not None:
        train_x, train_y = train_x[train_idx.numpy()], train_y[train_idx.numpy()]
    return DataSplits(
        train=_normalize(train_x, train_y, spec),
        val=val,
        test=_normalize(test_x, test_y, spec),
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        name=name,
    )


def make_synthetic(
    num_train: int,
    num_test: int,
    num_classes: int = 10,
    channels: int = 1,
    size: int = 28,
    seed: int = 0,
    noise: float = 1.0,
) -> DataSplits:
    """Learnable synthetic images ``x = t_y + noise · ε``, ε ~ N(0, I), for fast tests.

    Each class template ``t_k`` is an N(0, 1) field on a ``max(2, size // 4)`` grid, upsampled
    bilinearly to ``size`` and scaled to unit standard deviation, so it is smooth and survives
    crops. Labels are balanced (``i mod num_classes``) and shuffled.
    """
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not noise >= 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    num_train = _check_int("num_train", num_train, 1)
    num_test = _check_int("num_test", num_test, 1)
    num_classes = _check_int("num_classes", num_classes, 2)
    channels = _check_int("channels", channels, 1)
    size = _check_int("size", size, 4)
    gen = torch.Generator().manual_seed(seed)
    coarse_side = max(2, size // 4)
    coarse = torch.randn(num_classes, channels, coarse_side, coarse_side, generator=gen)
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    templates = templates / templates.std(dim=(1, 2, 3), keepdim=True)

    def sample(n: int) -> TensorData:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        eps = torch.randn(n, channels, size, size, generator=gen)
        return TensorData(templates[labels] + noise * eps, labels)

    return DataSplits(
        train=sample(num_train),
        val=None,
        test=sample(num_test),
        num_classes=num_classes,
        in_channels=channels,
        image_size=size,
        name=SYNTHETIC,
    )


# --------------------------------------------------------------------------------------------
# Augmentation


def default_augmentation(name: str) -> dict[str, Any]:
    """Augmentation arguments ``{"flip": bool, "pad": int}`` used for ``name``.

    The paper applies flips, 4-pixel padding and random crops to every dataset. We keep that for
    CIFAR-10/100 and Fashion-MNIST (clothing is left-right symmetric) but drop the flip for SVHN
    and MNIST, whose digits are not flip-invariant. The synthetic data get no augmentation.
    """
    if name == SYNTHETIC:
        return {"flip": False, "pad": 0}
    _spec(name)
    return {"flip": name in ("cifar10", "cifar100", "fashion-mnist"), "pad": 4}


def _shard_positions(n: int, rank: int, world: int) -> Tensor:
    """The positions of an epoch's order that ``DistributedSampler`` assigns to ``rank``."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
    return torch.tensor(list(sampler), dtype=torch.long)


def _draw_augmentation(
    n: int, generator: torch.Generator, flip: bool, pad: int
) -> tuple[Tensor | None, Tensor | None]:
    """Per-sample crop offsets (2×n, in [0, 2·pad]) and flip flags (n), or None when unused."""
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator) if pad > 0 else None
    flips = torch.rand(n, generator=generator) < 0.5 if flip else None
    return offsets, flips


def _apply_augmentation(
    images: Tensor, offsets: Tensor | None, flips: Tensor | None, pad: int
) -> Tensor:
    """Crop each zero-padded image at its (row, col) offset, then mirror the flagged ones."""
    if offsets is not None:
        n, c, h, w = images.shape
        padded = F.pad(images, (pad, pad, pad, pad))
        offsets = offsets.to(images.device)
        rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # n×h
        cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # n×w
        padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
        images = padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    if flips is not None:
        mask = flips.to(images.device)[:, None, None, None]
        images = torch.where(mask, images.flip(3), images)
    return images


def _check_augmentation(flip: object, pad: object) -> int:
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be a bool, got {flip!r}")
    return _check_int("pad", pad, 0)


def augment(images: Tensor, generator: torch.Generator, flip: bool, pad: int = 4) -> Tensor:
    """Random crop of the zero-padded batch (``pad`` pixels per side) plus optional flips.

    Each sample gets its own offset in ``[0, 2·pad]²`` and, if ``flip``, a horizontal mirror with
    probability 1/2, all drawn from ``generator``. Padding is 0 in normalized units, i.e. the
    dataset mean colour. Returns a new N×C×H×W tensor.
    """
    pad = _check_augmentation(flip, pad)
    if images.ndim != 4:
        raise ValueError(f"images must be N×C×H×W, got shape {tuple(images.shape)}")
    offsets, flips = _draw_augmentation(images.shape[0], generator, flip, pad)
    return _apply_augmentation(images, offsets, flips, pad)


# --------------------------------------------------------------------------------------------
# Batch loader


class BatchLoader:
    """Iterable over ``(images, labels)`` mini-batches of a :class:`TensorData`.

    At the start of each epoch the sample order (if ``shuffle``) and then every sample's
    augmentation are drawn from ``generator`` only, so an epoch is fixed by the generator state
    at its start. ``state_dict`` returns that state and the number of batches already handed
    out; ``load_state_dict`` rewinds to it, and the next iteration resumes after those batches.

    ``shard=(rank, world_size)``: this process's part of every epoch under data parallelism.
    All ranks draw the same order and augmentation (same generator seed); rank ``r`` keeps the
    positions ``torch.utils.data.DistributedSampler`` gives it (``r, r + N, ...``, the order
    padded to a multiple of ``N``), so with ``batch_size = B / N`` the ranks' batch ``b``
    together are the samples of batch ``b`` of one process with batch ``B`` (padding aside).
    """

    def __init__(
        self,
        data: TensorData,
        batch_size: int,
        shuffle: bool,
        augment: dict[str, Any] | None,
        generator: torch.Generator,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.batch_size = _check_int("batch_size", batch_size, 1)
        rank, world = shard
        _check_int("shard world size", world, 1)
        _check_int("shard rank", rank, 0, world - 1)
        self.shard = shard
        if drop_last and batch_size > len(data):
            raise ValueError(
                f"batch_size={batch_size} with drop_last=True exceeds the {len(data)} samples"
            )
        if augment is not None:
            unknown = set(augment) - {"flip", "pad"}
            if unknown:
                raise ValueError(f"augment accepts keys 'flip' and 'pad', got {sorted(unknown)}")
            augment = {"flip": augment.get("flip", False), "pad": augment.get("pad", 4)}
            augment["pad"] = _check_augmentation(augment["flip"], augment["pad"])
        self.data = data
        self.shuffle = shuffle
        self.augment = augment
        self.generator = generator
        self.drop_last = drop_last
        self._positions = _shard_positions(len(data), rank, world)
        self._epoch_state = generator.get_state()
        self._batches_done = 0
        self._in_epoch = False
        self._skip = 0

    def __len__(self) -> int:
        size = len(self._positions)
        return size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self._epoch_state = self.generator.get_state()
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        offsets, flips, pad = None, None, 0
        if self.augment is not None:
            pad = self.augment["pad"]
            offsets, flips = _draw_augmentation(n, self.generator, self.augment["flip"], pad)
        if self.shard[1] > 1:
            order = order[self._positions]
            offsets = None if offsets is None else offsets[:, self._positions]
            flips = None if flips is None else flips[self._positions]
        start, self._skip = self._skip, 0
        self._batches_done = start
        self._in_epoch = True
        return self._batches(order, offsets, flips, pad, start)

    def _batches(
        self, order: Tensor, offsets: Tensor | None, flips: Tensor | None, pad: int, start: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        for b in range(start, len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = order[sl]
            images = self.data.images[idx]
            if self.augment is not None:
                batch_offsets = None if offsets is None else offsets[:, sl]
                batch_flips = None if flips is None else flips[sl]
                images = _apply_augmentation(images, batch_offsets, batch_flips, pad)
            self._batches_done = b + 1
            yield images, self.data.labels[idx]
        self._in_epoch = False

    def state_dict(self) -> dict[str, Any]:
        """Generator state at the start of the current epoch and batches handed out in it.

        Outside an epoch (before the first, or after one ran to its end) this is the current
        generator state, i.e. the start of the next epoch, with 0 batches done.
        """
        if self._in_epoch:
            return {
                "generator_state": self._epoch_state.clone(),
                "batches_done": self._batches_done,
            }
        return {"generator_state": self.generator.get_state(), "batches_done": 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rewind the generator; the next iteration replays that epoch minus its done batches."""
        self.generator.set_state(state["generator_state"])
        self._skip = _check_int("batches_done", state.get("batches_done", 0), 0, len(self))
        self._in_epoch = False
