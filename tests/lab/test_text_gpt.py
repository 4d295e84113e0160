"""The byte-level text data (stdlib sources split by file) and the small SDPA GPT."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from eigensam.lab.workloads.gpt import TinyGPT, lm_loss
from eigensam.lab.workloads.text import (
    ByteWindows,
    corpus_files,
    decode,
    encode,
    load_corpus,
    split_of,
    stdlib_root,
)


def make_corpus(folder: Path, count: int = 40) -> dict[str, str]:
    texts = {}
    for i in range(count):
        relative = f"pkg{i % 3}/module_{i}.py"
        texts[relative] = f"# file {i}\nvalue_{i} = {i * i}  # é ünïcode\n"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(texts[relative], encoding="utf-8")
    (folder / "notes.txt").write_text("not python\n")
    return texts


@pytest.mark.parametrize("text", ["", "print('hi')\n", "λ₁ — Align ✓ 🙂", "\x00\x7f"])
def test_byte_tokenizer_round_trips(text: str) -> None:
    ids = encode(text)
    assert ids.dtype == torch.long and len(ids) == len(text.encode("utf-8"))
    assert all(0 <= v < 256 for v in ids.tolist())
    assert decode(ids) == text
    assert decode(ids.tolist()) == text


def test_decode_rejects_values_outside_a_byte() -> None:
    with pytest.raises(ValueError, match=r"ids must be byte values in \[0, 256\)"):
        decode([65, 256])


def test_split_is_by_file_and_deterministic(tmp_path: Path) -> None:
    texts = make_corpus(tmp_path)
    corpus = load_corpus(tmp_path, valid_fraction=0.3)
    train, valid = corpus.files["train"], corpus.files["validation"]
    assert sorted(train + valid) == sorted(texts)  # every file once; notes.txt is not *.py
    assert not set(train) & set(valid)
    assert valid and train
    # The stream is the files' bytes concatenated in sorted path order.
    expected = "".join(texts[name] for name in sorted(valid)).encode("utf-8")
    assert bytes(corpus.validation.tolist()) == expected
    again = load_corpus(tmp_path, valid_fraction=0.3)
    assert torch.equal(again.train, corpus.train) and again.files == corpus.files
    # A file's split depends on its path alone: adding files moves none of the others.
    (tmp_path / "zzz_extra.py").write_text("extra = 1\n")
    grown = load_corpus(tmp_path, valid_fraction=0.3)
    assert set(valid) <= set(grown.files["validation"])
    assert set(train) <= set(grown.files["train"])
    assert all(split_of(name, 0.3) == "validation" for name in valid)


def test_split_fraction_is_close_to_the_request() -> None:
    names = [f"lib/m{i}.py" for i in range(4000)]
    share = sum(split_of(n, 0.1) == "validation" for n in names) / len(names)
    assert abs(share - 0.1) < 0.02


def test_stdlib_corpus_is_found_and_capped() -> None:
    files = corpus_files()
    assert any(p.name == "os.py" for p in files)
    corpus = load_corpus(max_bytes=50_000)
    assert len(corpus.train) == len(corpus.validation) == 50_000
    assert corpus.root == stdlib_root()


def test_missing_corpus_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"root=.*nowhere.*is not a folder"):
        load_corpus(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"holds no \*\.py file"):
        load_corpus(tmp_path)
    (tmp_path / "only.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="split .* is empty"):
        load_corpus(tmp_path)
    with pytest.raises(ValueError, match="valid_fraction must be in"):
        load_corpus(tmp_path, valid_fraction=1.5)


def test_windows_are_next_byte_pairs() -> None:
    stream = torch.arange(23, dtype=torch.uint8)
    windows = ByteWindows(stream, context=5)
    assert len(windows) == 4  # (23 - 1) // 5
    x, y = windows[2]
    assert x.tolist() == [10, 11, 12, 13, 14] and y.tolist() == [11, 12, 13, 14, 15]
    assert windows[-1][0].tolist() == windows[3][0].tolist()
    item = ByteWindows(stream, context=5, hf=True)[1]
    assert item["input_ids"].tolist() == item["labels"].tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(IndexError):
        windows[4]
    with pytest.raises(ValueError, match="shorter than one window"):
        ByteWindows(stream[:5], context=5)


def reference_attention(block, x: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d + M)V written out, M = −∞ above the diagonal."""
    b, t, c = x.shape
    h = block.heads
    q, k, v = block.qkv(x).split(c, dim=2)
    q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(c // h)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    weights = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return block.proj((weights @ v).transpose(1, 2).reshape(b, t, c))


def test_attention_matches_the_written_out_formula() -> None:
    torch.manual_seed(0)
    model = TinyGPT(context=12, width=32, layers=2, heads=4)
    x = torch.randn(3, 12, 32)
    attn = model.blocks[0].attn
    torch.testing.assert_close(attn(x), reference_attention(attn, x), rtol=1e-5, atol=1e-6)


def test_gpt_is_causal_and_tied() -> None:
    torch.manual_seed(0)
    model = TinyGPT(context=16, width=32, layers=2, heads=2)
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 256)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    assert model.head.weight is model.tokens.weight
    # At initialization the prediction of unrelated bytes is close to uniform over 256 bytes.
    targets = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert abs(float(lm_loss(a.detach(), targets)) - math.log(256)) < 0.1


def test_gpt_learns_a_repeating_text() -> None:
    torch.manual_seed(0)
    model = TinyGPT(context=16, width=32, layers=1, heads=2)
    stream = encode("abcabcabcabd" * 20)
    x = torch.stack([stream[i : i + 16] for i in range(0, 160, 8)])
    y = torch.stack([stream[i + 1 : i + 17] for i in range(0, 160, 8)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = lm_loss(model(x), y)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * first


def test_sequence_longer_than_the_context_is_refused() -> None:
    model = TinyGPT(context=8, width=16, layers=1, heads=2)
    with pytest.raises(ValueError, match=r"idx has sequence length 9.*context=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of heads"):
        TinyGPT(width=30, heads=4)
    with pytest.raises(ValueError, match="layers must be a positive int"):
        TinyGPT(layers=0)
