"""Byte-level language-modelling data from text every machine with Python has: the source files
of the Python standard library, split by file into train and validation.

Tokens are bytes (vocabulary of :data:`VOCAB_SIZE` = 256): :func:`encode` is the UTF-8 encoding
and :func:`decode` its inverse, so no tokenizer is downloaded and ``decode(encode(s)) == s``.

The split is a function of each file's path relative to the corpus root alone: a file goes to
validation when ``crc32(path) mod 10⁴ < valid_fraction·10⁴``, so it does not depend on the order
the file system lists files in, on the other files present, or on Python's hash seed. Within a
split, files are concatenated in sorted path order; ``max_bytes`` keeps the first bytes of that
stream.
"""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

VOCAB_SIZE = 256
SPLITS = ("train", "validation")
_BUCKETS = 10_000


def stdlib_root() -> Path:
    """The folder of the running Python's standard library (``sysconfig``'s ``stdlib``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def encode(text: str) -> Tensor:
    """The UTF-8 bytes of ``text`` as a 1-D ``torch.long`` tensor of values in [0, 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: Tensor | Sequence[int]) -> str:
    """The text whose UTF-8 bytes are ``ids`` (inverse of :func:`encode`); ``ValueError`` for a
    value outside [0, 256), ``UnicodeDecodeError`` for bytes that are not UTF-8."""
    values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    bad = [v for v in values if not 0 <= v < VOCAB_SIZE]
    if bad:
        raise ValueError(f"ids must be byte values in [0, {VOCAB_SIZE}), got {bad[:5]}")
    return bytes(values).decode("utf-8")


def split_of(relative: str, valid_fraction: float) -> str:
    """``"validation"`` or ``"train"`` for the file at POSIX path ``relative`` (see the module
    documentation for the rule)."""
    bucket = zlib.crc32(relative.encode("utf-8")) % _BUCKETS
    return "validation" if bucket < round(valid_fraction * _BUCKETS) else "train"


def corpus_files(root: Path | str | None = None, pattern: str = "*.py") -> list[Path]:
    """The files matching ``pattern`` under ``root`` (default: :func:`stdlib_root`), sorted by
    relative path, leaving out ``site-packages`` and ``dist-packages`` (installed packages
    differ between machines).
    ``FileNotFoundError`` naming ``root`` when it is not a folder or holds no such file."""
    folder = stdlib_root() if root is None else Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"text corpus root={str(folder)!r} is not a folder; pass root= a folder of "
            f"{pattern} files (default: the Python standard library, {stdlib_root()})"
        )
    files = sorted(
        (
            p
            for p in folder.rglob(pattern)
            if p.is_file() and "site-packages" not in p.parts and "dist-packages" not in p.parts
        ),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise FileNotFoundError(
            f"text corpus root={str(folder)!r} holds no {pattern} file; pass root= a folder of "
            f"{pattern} files (default: the Python standard library, {stdlib_root()})"
        )
    return files


@dataclass
class ByteCorpus:
    """The two splits as 1-D ``torch.uint8`` byte streams and the files each holds (relative
    POSIX paths, in stream order)."""

    root: Path
    train: Tensor
    validation: Tensor
    files: dict[str, list[str]]


def load_corpus(
    root: Path | str | None = None,
    *,
    valid_fraction: float = 0.1,
    max_bytes: int | None = None,
    pattern: str = "*.py",
) -> ByteCorpus:
    """Read the corpus under ``root`` and split it by file (module documentation);
    ``max_bytes`` (per split) stops reading once a split holds that many bytes."""
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, int | float):
        raise TypeError(f"valid_fraction must be a number in (0, 1), got {valid_fraction!r}")
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)):
        raise TypeError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes}")
    folder = stdlib_root() if root is None else Path(root)
    files = corpus_files(folder, pattern)
    chunks: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    for path in files:
        relative = path.relative_to(folder).as_posix()
        split = split_of(relative, valid_fraction)
        if max_bytes is not None and sizes[split] >= max_bytes:
            continue
        data = path.read_bytes()
        if max_bytes is not None:
            data = data[: max_bytes - sizes[split]]
        chunks[split].append(data)
        names[split].append(relative)
        sizes[split] += len(data)
    for split in SPLITS:
        if not sizes[split]:
            raise ValueError(
                f"the {split} split of root={str(folder)!r} is empty ({len(files)} files, "
                f"valid_fraction={valid_fraction}); use a corpus with more files"
            )
    streams = {
        split: torch.frombuffer(bytearray(b"".join(chunks[split])), dtype=torch.uint8)
        for split in SPLITS
    }
    return ByteCorpus(folder, streams["train"], streams["validation"], names)


class ByteWindows(Dataset):
    """Non-overlapping windows of ``context + 1`` bytes of ``stream``: item ``i`` is the pair
    ``(x, y)`` of ``torch.long`` tensors with ``x = stream[i·c : i·c + c]`` and
    ``y = stream[i·c + 1 : i·c + c + 1]`` (next-byte targets), ``c = context``. With
    ``hf=True`` item ``i`` is ``{"input_ids": x, "labels": x}`` instead (Transformers' causal
    models shift the labels themselves)."""

    def __init__(self, stream: Tensor, context: int, *, hf: bool = False):
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise ValueError(f"context must be a positive int, got {context!r}")
        if stream.dim() != 1:
            raise ValueError(f"stream must be 1-D, got shape {tuple(stream.shape)}")
        self.stream = stream
        self.context = context
        self.hf = hf
        self.count = (len(stream) - 1) // context
        if self.count < 1:
            raise ValueError(
                f"stream of {len(stream)} bytes is shorter than one window of context + 1 = "
                f"{context + 1} bytes"
            )

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor] | dict[str, Tensor]:
        if not -self.count <= index < self.count:
            raise IndexError(f"window {index} out of range for {self.count} windows")
        start = (index % self.count) * self.context
        window = self.stream[start : start + self.context + 1].long()
        if self.hf:
            return {"input_ids": window[:-1], "labels": window[:-1]}
        return window[:-1], window[1:]
