"""Table 2's CPU protocol: the digits task's preparation (on synthetic images), the plan of
fine-tuning runs (SGD gets 2N steps), the missing-package error before anything trains, and the
fine-tuning loop's contract on a tiny synthetic task (a few steps, not a training run)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_runs import tiny

from eigensam.cli import main
from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.train import Trainer
from eigensam.lab.experiments import pilot, reproduce
from eigensam.lab.experiments.runs import make_scale
from eigensam.lab.experiments.targets import finetune, table2
from eigensam.lab.experiments.targets.finetune import Finetune, plan_finetunes, split_digits
from eigensam.lab.workloads.models import build_model


def synthetic_digits(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 17, (n, 8, 8), generator=generator).float()
    return images, torch.arange(n) % 10


def test_split_digits_upsamples_splits_and_normalizes():
    images, labels = synthetic_digits()
    data = split_digits(images, labels, test_fraction=0.3, seed=0, size=28)
    assert data.train.images.shape == (35, 1, 28, 28) and data.test.images.shape == (15, 1, 28, 28)
    assert data.num_classes == 10 and data.in_channels == 1 and data.image_size == 28
    assert abs(float(data.train.images.mean())) < 1e-5
    assert float(data.train.images.std()) == pytest.approx(1.0, rel=1e-4)
    # A disjoint, seeded split: the same seed gives the same test set, another seed another.
    again = split_digits(images, labels, test_fraction=0.3, seed=0, size=28)
    assert torch.equal(again.test.images, data.test.images)
    other = split_digits(images, labels, test_fraction=0.3, seed=1, size=28)
    assert not torch.equal(other.test.labels, data.test.labels)
    # Bilinear upsampling of a constant image is that constant.
    constant = torch.cat([torch.full((5, 8, 8), 3.0), torch.full((5, 8, 8), 5.0)])
    flat = split_digits(constant, torch.arange(10), size=16).train.images
    assert torch.allclose(flat, flat[:, :, :1, :1].expand_as(flat))
    with pytest.raises(ValueError, match="all equal"):
        split_digits(torch.ones(10, 8, 8), torch.arange(10))
    with pytest.raises(ValueError, match="test_fraction"):
        split_digits(images, labels, test_fraction=1.0)
    with pytest.raises(ValueError, match="images must be"):
        split_digits(images.flatten(1), labels)


def test_plan_gives_sgd_twice_the_steps_of_sam_and_eigen_sam():
    runs = plan_finetunes(150, [0, 1, 2])
    assert list(runs) == ["sgd", "sam", "eigen-sam"]
    assert [r.steps for r in runs["sgd"]] == [300] * 3
    assert [r.steps for r in runs["eigen-sam"]] == [150] * 3
    assert [r.seed for r in runs["sam"]] == [0, 1, 2]
    assert all(r.settings().lr == 0.01 for rs in runs.values() for r in rs)  # the paper's lr
    assert runs["eigen-sam"][0].settings().resolved_alpha == 0.2
    with pytest.raises(ValueError, match="steps must be"):
        plan_finetunes(0, [0])


def test_table2_plans_one_cached_pretraining_run(tmp_path):
    scale = make_scale("cpu", tmp_path, seeds=(0, 1, 2))
    plan = table2.plan(scale)
    (pretrain,) = plan["pretrain"]
    assert (pretrain.model, pretrain.dataset, pretrain.method) == (
        "vit-small",
        "fashion-mnist",
        "sgd",
    )
    assert pretrain.seed == 0 and pretrain.track_every == 0
    with pytest.raises(ValueError, match="table2 .* not implemented"):
        table2.plan(make_scale("paper", tmp_path))


def test_missing_scikit_learn_is_one_error_line_before_training(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "sklearn" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match="scikit-learn is not installed.*eigensam\\[reproduce\\]"):
        finetune.load_digits()
    assert main(["reproduce", "table2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scikit-learn" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_finetune_replaces_the_head_and_is_deterministic():
    torch.manual_seed(0)
    pretrained = build_model("vit-small", 3, 1, 28, 0.125)
    data = split_digits(*synthetic_digits(40), size=28)
    run = Finetune("sam", seed=3, steps=2, batch_size=8)
    first, second = (
        finetune.finetune(pretrained, data, run),
        finetune.finetune(pretrained, data, run),
    )
    timing = ("cpu_seconds",)
    assert {k: v for k, v in first.items() if k not in timing} == {
        k: v for k, v in second.items() if k not in timing
    }
    assert first["steps"] == 2 and first["method"] == "sam" and first["cpu_seconds"] > 0
    assert 0 <= first["test_acc"] <= 1 and first["train_loss"] > 0
    tuned = finetune.new_head(pretrained, 10, seed=3)
    assert tuned.head.out_features == 10 and pretrained.head.out_features == 3
    body = [k for k in pretrained.state_dict() if not k.startswith("head.")]
    assert all(torch.equal(tuned.state_dict()[k], pretrained.state_dict()[k]) for k in body)


def test_table2_is_a_target():
    assert reproduce.TARGETS["table2"].min_seeds == 2


def test_finetune_pilot_records_in_a_folder_it_creates(tmp_path, monkeypatch):
    """``pilot --finetune-from RUN --steps N``: fine-tunes the run's model (here a tiny ViT
    trained one epoch on synthetic images; the digits replaced by synthetic ones) and appends
    its record to ``<out>/pilot.jsonl``, creating ``out``."""
    config = tiny(tmp_path, model="vit-small", width=0.5, epochs=1, track_every=0)
    Trainer(config).run()
    monkeypatch.setattr(finetune, "load_digits", lambda: split_digits(*synthetic_digits(60)))
    out = tmp_path / "pilot" / "new"
    record = pilot.run_finetune_pilot(out, config.run_dir, steps=2)
    assert record["steps"] == 2 and 0.0 <= record["test_acc"] <= 1.0
    assert (out / pilot.PILOT_FILE).read_text(encoding="utf-8").count("\n") == 1
    # Cached as table2 caches its fine-tunings: a second pilot of the same N reuses it.
    assert (out / "finetune" / "sgd-steps2-seed0.json").is_file()
    monkeypatch.setattr(finetune, "finetune", lambda *a: pytest.fail("not reused"))
    assert pilot.run_finetune_pilot(out, config.run_dir, steps=2) == record


def test_table2_section_shows_the_pilot_and_the_n_it_picks(tmp_path):
    def record(method, steps, acc):
        return {
            "kind": "finetune-pilot",
            "method": method,
            "steps": steps,
            "train_acc": acc,
            "test_acc": 0.9,
            "cpu_seconds": 100.0,
        }

    path = tmp_path / pilot.PILOT_FILE
    assert table2._pilot(path) == ""
    for r in (
        record("sam", 600, 0.95),
        record("sam", 1200, 0.991),
        record("eigen-sam", 1200, 0.97),
    ):
        tracking.append_record(path, r)
    assert "N by the pilot rule: none measured." in table2._pilot(path)
    tracking.append_record(path, record("eigen-sam", 1200, 0.993))  # the last record counts
    text = table2._pilot(path)
    assert "N by the pilot rule: 1200." in text and "| 1200 | eigen-sam | 1200 | 99.30 |" in text
    assert text.count("| 1200 | eigen-sam |") == 1


def test_table2_budget_sentence_sums_the_methods_mean_cpu_seconds():
    def runs(*cpu):
        return [{"cpu_seconds": c} for c in cpu]

    results = {"sgd": runs(100.0, 120.0), "sam": runs(200.0, 200.0), "eigen-sam": runs(300.0)}
    text = table2._budget(results)
    assert text.startswith("\n2 seeds") and "take 610 CPU-seconds" in text
    assert table2._budget({"sgd": [{"train_acc": 1.0}], "sam": [], "eigen-sam": []}) == ""
