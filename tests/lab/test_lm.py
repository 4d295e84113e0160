"""The language-model runs (eigensam.lab.engine.lm_training) and the ``lm`` reproduction target's
plan."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from eigensam.lab.engine.lm_training import (
    LMSettings,
    build_model,
    curvature,
    fd_accuracy,
    fixed_batch,
    lm_corpus,
    lm_optimizer,
    train_lm,
    warmup_cosine,
)
from eigensam.lab.experiments import reproduce
from eigensam.lab.experiments.runs import make_scale
from eigensam.lab.experiments.targets import lm as target
from eigensam.lab.workloads.gpt import TinyGPT
from eigensam.lab.workloads.text import ByteWindows
from eigensam.optim import SAM, EigenSAM

pytestmark = pytest.mark.filterwarnings("ignore:hvp='auto'.*finite differences:RuntimeWarning")

TINY = LMSettings(
    context=8,
    width=16,
    layers=1,
    heads=2,
    batch_size=4,
    steps=6,
    warmup=2,
    optimizer=replace(LMSettings().optimizer, eig_interval=3, eig_iters=2),
    track_every=3,
    track_iters=2,
    eval_windows=8,
    train_bytes=4000,
    valid_bytes=2000,
)


@pytest.fixture(scope="module")
def corpus():
    return lm_corpus(TINY)


def test_plan_lists_every_method_for_every_seed(tmp_path: Path) -> None:
    scale = make_scale("cpu", tmp_path, seeds=[3, 4])
    runs = target.plan_runs(scale)
    assert [(r.method, r.seed) for r in runs] == [
        ("adamw", 3),
        ("sam", 3),
        ("eigen-sam", 3),
        ("adamw", 4),
        ("sam", 4),
        ("eigen-sam", 4),
    ]
    assert [r.fd_check for r in runs] == [False, False, True, False, False, False]
    assert runs[0].file(tmp_path) == tmp_path / "runs" / "adamw-seed3.json"
    assert target.plan(scale) == {}  # no runs of the image engine
    with pytest.raises(ValueError, match="trains on the CPU; got --device 'cuda'"):
        target.plan(make_scale("cpu", tmp_path, overrides={"device": "cuda"}))
    assert reproduce.TARGETS["lm"] is target.TARGET


def test_cpu_plan_fits_thirty_minutes_for_five_seeds(tmp_path: Path) -> None:
    runs = target.plan_runs(make_scale("cpu", tmp_path))
    assert len(runs) == 15
    assert target.planned_seconds(runs) <= 30 * 60
    cpu = runs[0].settings
    assert (cpu.layers, cpu.width, cpu.context) == (4, 128, 64)
    paper = target.plan_runs(make_scale("paper", tmp_path))[0].settings
    assert paper.train_bytes is None and paper.width == 256


def test_passes_formula_counts_the_training_forward_passes(corpus) -> None:
    """settings.passes(method) is the number of gradient-taking forward passes a run makes
    (Eigen-SAM's first refresh also tries the exact product once: one pass more)."""
    for method in ("adamw", "sam", "eigen-sam"):
        calls = []

        def count(module, args, calls=calls):
            if isinstance(module, TinyGPT) and torch.is_grad_enabled():
                calls.append(1)

        handle = register_module_forward_pre_hook(count)
        try:
            train_lm(method, 0, TINY, corpus)
        finally:
            handle.remove()
        extra = 1 if method == "eigen-sam" else 0
        assert len(calls) == TINY.passes(method) + extra, method


def test_warmup_cosine_schedule() -> None:
    f = warmup_cosine(replace(TINY, steps=12, warmup=2))
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(7) == pytest.approx(0.5)
    assert f(12) == pytest.approx(0.0, abs=1e-12)


def test_optimizers_are_adamw_and_sam_around_adamw() -> None:
    model = build_model(TINY, 0)
    assert isinstance(lm_optimizer("adamw", model, TINY), torch.optim.AdamW)
    sam = lm_optimizer("sam", model, TINY)
    assert type(sam) is SAM and isinstance(sam.base_optimizer, torch.optim.AdamW)
    eigen = lm_optimizer("eigen-sam", model, TINY)
    assert isinstance(eigen, EigenSAM) and eigen.tracker.interval == TINY.optimizer.eig_interval
    assert eigen.param_groups[0]["lr"] == 1e-3 and eigen.param_groups[0]["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="method must be one of adamw, sam, eigen-sam"):
        lm_optimizer("sgd", model, TINY)


def test_finite_difference_products_match_the_math_backend(corpus) -> None:
    model = build_model(TINY, 0)
    batch = fixed_batch(ByteWindows(corpus.train, TINY.context), 4, 0)
    check = fd_accuracy(model, batch, vectors=2)
    assert len(check["random"]) == 2
    assert max(check["random"]) < 1e-2 and check["top"] < 1e-2
    assert check["lambda1_fd"] == pytest.approx(check["lambda1_exact"], rel=1e-2)
    # The curvature measurement's λ₁ (finite differences, 30 power steps) agrees too.
    c = curvature(model, torch.optim.AdamW(model.parameters()), batch, 30, None, 0)
    assert c["lambda1"] == pytest.approx(check["lambda1_exact"], rel=0.05)
    assert 1 - math.sqrt(2) <= c["align"] <= 1


def test_analyze_trains_once_and_reuses_the_records(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(target.SETTINGS, "cpu", TINY)
    scale = make_scale("cpu", tmp_path, seeds=[0, 1])
    section = target.analyze(scale, target.plan(scale), tmp_path)
    assert [c.verdict for c in section.claims]  # four verdicts from two seeds
    assert len(section.claims) == 4 and (tmp_path / "lm.png").is_file()
    assert "Accuracy of the finite-difference products" in section.body
    record = json.loads((tmp_path / "runs" / "eigen-sam-seed0.json").read_text())
    assert record["fd_accuracy"]["end"]["top"] < 1e-2
    assert [t["step"] for t in record["track"]] == [0, 3, 6]
    assert record["val_loss"] == record["track"][-1]["val_loss"]

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(target, "train_lm", fail)
    again = target.analyze(scale, {}, tmp_path)
    assert again.body == section.body
