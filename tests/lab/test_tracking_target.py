"""The tracking target's pieces without training: the summary of observations, the frontier,
the plan, the config's estimator field and the measurement against planted eigenvectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eigensam.hessian.estimators import (
    DEFAULT_ESTIMATOR,
    AveragedPower,
    BurstPower,
    default_budget,
    make_estimator,
)
from eigensam.hessian.tracker import EigenTracker
from eigensam.lab.engine.config import TrainConfig
from eigensam.lab.engine.optimizers import build_optimizer
from eigensam.lab.experiments.runs import make_scale
from eigensam.lab.experiments.targets import tracking
from eigensam.lab.experiments.tracking_study import Observer, _measure, reference_eigenpairs


def test_summarize_averages_after_the_first_measurement() -> None:
    def entry(cos: float) -> dict[str, object]:
        return {"abs_cos": cos, "capture": [cos, 0.9, 0.95, 0.97, 1.0]}

    observations = {
        "steps": 100,
        "products": {"a": 25, "b": 0},
        "measurements": [
            {"estimators": {"a": entry(0.0)}},  # the first is left out
            {"estimators": {"a": entry(0.6), "b": entry(0.1)}},
            {"estimators": {"a": entry(0.8), "b": entry(0.3)}},
        ],
    }
    summary = tracking.summarize(observations)
    assert summary["a"]["abs_cos"] == pytest.approx(0.7)
    assert summary["b"]["abs_cos"] == pytest.approx(0.2)
    assert summary["a"]["capture2"] == pytest.approx(0.9)
    assert summary["a"]["products_per_step"] == pytest.approx(0.25)


def test_pareto_keeps_points_nothing_beats() -> None:
    points = [(1.0, 0.5, "a"), (1.1, 0.4, "b"), (1.2, 0.9, "c"), (1.5, 0.8, "d"), (0.9, 0.1, "e")]
    assert [p[2] for p in tracking._pareto(points)] == ["e", "a", "c"]


def test_every_listed_estimator_builds_and_the_paper_rows_are_the_papers_rule() -> None:
    for label in tracking.ESTIMATORS:
        rule = tracking.make_rule(label)
        assert 1 + rule.extra_vectors + int(rule.uses_free_products) <= 4  # memory budget
    for label, interval in zip(tracking.AGAINST, (100, 20), strict=True):
        paper = tracking.make_rule(label)
        assert isinstance(paper, BurstPower) and (paper.interval, paper.iters) == (interval, 5)
    name, interval, iters, options = tracking.ESTIMATORS[tracking.DEFAULT_LABEL]
    # the row labelled as the library's default is its rule at its own budget
    assert (name, (interval, iters), options) == (DEFAULT_ESTIMATOR, default_budget(name), {})


def test_plan_runs_sam_the_headlines_eigen_sam_and_the_two_arms(tmp_path) -> None:
    scale = make_scale("cpu", tmp_path, seeds=(0, 1))
    plan = tracking.plan(scale)
    assert list(plan) == list(tracking.METHODS)
    assert all(len(configs) == 2 for configs in plan.values())
    headline = plan["eigen-sam"][0]
    assert (headline.eig_estimator, headline.eig_interval, headline.eig_iters) == ("power", 20, 5)
    # The headline's runs are the headline's run folders.
    assert headline.run_dir.name == "eigen-sam-seed0"
    paper, default = plan[tracking.PAPER_ARM][1], plan[tracking.DEFAULT_ARM][1]
    assert (paper.method, paper.eig_estimator, paper.eig_interval, paper.eig_iters) == (
        "eigen-sam",
        "power",
        100,
        5,
    )
    # The default arm runs the library's default rule at its default budget.
    assert (default.eig_estimator, (default.eig_interval, default.eig_iters)) == (
        DEFAULT_ESTIMATOR,
        default_budget(DEFAULT_ESTIMATOR),
    )
    assert len({c.run_dir for configs in plan.values() for c in configs}) == 8
    with pytest.raises(ValueError, match="CPU scale"):
        tracking.plan(make_scale("paper", tmp_path))
    with pytest.raises(ValueError, match="label: 'averaged p=20' has options"):
        tracking.arm_fields("averaged p=20")


def test_the_outcome_claims_compare_the_default_with_the_papers_budget_and_sam() -> None:
    pairs = {(spec.a, spec.b) for spec in tracking.SPECS}
    assert pairs == {
        (tracking.DEFAULT_ARM, tracking.PAPER_ARM),
        (tracking.DEFAULT_ARM, "sam"),
    }
    metrics = [spec.metric for spec in tracking.SPECS if spec.b == "sam"]
    assert metrics == ["mean_align", "lambda1", "trace", "held_out_acc"]


def _per_seed(values: dict[str, list[float]]) -> tracking.PerSeedSummary:
    """Synthetic per-seed summaries: ``values[label][seed]`` is the mean |cos| of ``label`` on
    ``seed`` (capture k = cos for every k; products per step 0.05)."""
    seeds = range(len(next(iter(values.values()))))
    return {
        seed: {
            label: {
                "abs_cos": cos[seed],
                **{f"capture{k}": cos[seed] for k in range(1, 6)},
                "products_per_step": 0.05,
            }
            for label, cos in values.items()
        }
        for seed in seeds
    }


def test_aggregate_is_the_mean_over_seeds_of_each_value() -> None:
    per_seed = _per_seed({"a": [0.2, 0.4, 0.9], "b": [0.1, 0.1, 0.4]})
    del per_seed[2]["b"]  # a seed without b: b's mean is over the two others
    summary = tracking.aggregate(per_seed)
    assert summary["a"]["abs_cos"] == pytest.approx(0.5)
    assert summary["a"]["capture3"] == pytest.approx(0.5)
    assert summary["a"]["seeds"] == 3
    assert summary["b"]["abs_cos"] == pytest.approx(0.1)
    assert summary["b"]["seeds"] == 2
    assert summary["b"]["products_per_step"] == pytest.approx(0.05)


def test_paired_difference_is_the_paired_t_interval_of_the_per_seed_differences() -> None:
    # differences +0.1, +0.2, +0.3: mean 0.2, sd 0.1, t_{0.975, 2} = 4.302653 -> ±0.2484
    per_seed = _per_seed({"a": [0.6, 0.7, 0.8], "paper": [0.5, 0.5, 0.5]})
    difference = tracking.paired_difference(per_seed, "a", "paper")
    assert difference is not None
    assert difference.mean == pytest.approx(0.2)
    assert difference.half_width == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-6)
    assert (difference.seeds, difference.higher) == ((0, 1, 2), 3)
    assert difference.low == pytest.approx(0.2 - difference.half_width)
    assert difference.text() == "+0.200 ± 0.248 (higher on 3 of 3)"
    reverse = tracking.paired_difference(per_seed, "paper", "a", seeds=(0, 2))
    assert reverse is not None
    assert reverse.mean == pytest.approx(-0.2) and reverse.higher == 0
    assert reverse.seeds == (0, 2)
    one = tracking.paired_difference(per_seed, "a", "paper", seeds=(1,))
    assert one is not None and one.half_width is None and one.low == pytest.approx(0.2)
    assert tracking.paired_difference(per_seed, "a", "missing") is None


def test_confirmation_uses_only_the_held_out_seeds() -> None:
    # Seeds 0-1 favour the candidate strongly, seeds 2-4 do not: only 2-4 count.
    per_seed = _per_seed(
        {"candidate": [0.9, 0.9, 0.5, 0.6, 0.55], "paper": [0.1, 0.1, 0.6, 0.5, 0.55]}
    )
    text = tracking.confirmation(per_seed, "candidate", "paper", (2, 3, 4))
    assert text.startswith("candidate against paper on seeds 2, 3, 4 alone:")
    assert "difference +0.000 ± " in text
    assert "(higher on 1 of 3), 95% interval not above 0." in text
    above = tracking.confirmation(per_seed, "candidate", "paper", (0, 1))
    assert "difference +0.800 ± 0.000 (higher on 2 of 2), 95% interval above 0." in above
    partial = tracking.confirmation(per_seed, "candidate", "paper", (3, 7))
    assert "(seeds 7 not measured yet)" in partial and "no interval from one seed" in partial
    assert tracking.confirmation(per_seed, "candidate", "paper", (8, 9)).endswith(
        "not measured yet."
    )


def test_config_estimator_field_reaches_the_optimizer() -> None:
    model = nn.Linear(3, 2)
    config = TrainConfig(method="eigen-sam", eig_estimator="averaged", eig_interval=20)
    opt = build_optimizer(config.optimizer, model)
    assert isinstance(opt.tracker.rule, AveragedPower) and opt.tracker.interval == 20
    paper = build_optimizer(TrainConfig(method="eigen-sam").optimizer, model)
    assert isinstance(paper.tracker.rule, BurstPower)  # the lab's default is the paper's
    spread = build_optimizer(TrainConfig(method="x-sam", eig_schedule="spread").optimizer, model)
    assert spread.tracker.rule.name == "spread"


def test_config_estimator_field_is_checked() -> None:
    with pytest.raises(ValueError, match="eig_estimator"):
        TrainConfig(method="eigen-sam", eig_estimator="nope")
    with pytest.raises(ValueError, match="must stay power and burst"):
        TrainConfig(method="eigen-sam", eig_estimator="averaged", eig_method="lanczos")


def test_measure_against_planted_top_eigenvectors() -> None:
    """An estimate set to the reference ``v₁`` has ``|cos| = 1`` and capture 1 for every k; one
    set to ``v₂`` has ``|cos| = 0`` and capture 1 from k = 2 on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batches = [(torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,)))]
    _, vectors = reference_eigenpairs(model, batches, 5, seed=0)
    observers = {}
    for name, row in (("v1", 0), ("v2", 1)):
        tracker = EigenTracker(estimator=make_estimator("power"))
        tracker.vector = vectors[row].clone()
        observers[name] = Observer(tracker)
    record = _measure(0, model, batches, observers, seed=0)
    v1, v2 = record["estimators"]["v1"], record["estimators"]["v2"]
    assert v1["abs_cos"] == pytest.approx(1.0, abs=1e-6)
    assert v1["capture"] == pytest.approx([1.0] * 5, abs=1e-6)
    assert v2["abs_cos"] == pytest.approx(0.0, abs=1e-6)
    assert v2["capture"][1:] == pytest.approx([1.0] * 4, abs=1e-6)
    assert record["eigenvalues"][0] >= record["eigenvalues"][1]


def test_decisions_list_the_estimators_that_beat_the_paper_at_no_more_products() -> None:
    per_seed = _per_seed(
        {
            "paper p=100": [0.50, 0.55, 0.45],
            "cheap and better": [0.60, 0.62, 0.58],
            "better on average, not on every seed": [0.90, 0.40, 0.80],
            "better but more products": [0.90, 0.92, 0.95],
            "cheap and worse": [0.40, 0.42, 0.38],
        }
    )
    for summary in per_seed.values():
        summary["better but more products"]["products_per_step"] = 0.06
        summary["paper p=100"]["products_per_step"] = 0.052
    entry = {
        "per_seed": per_seed,
        "tracking": tracking.aggregate(per_seed),
        "timing": {
            "paper p=100": 1.10,
            "cheap and better": 1.11,  # measured slower: listed, with its step time
            "better on average, not on every seed": 1.05,
            "better but more products": 1.30,
            "cheap and worse": 1.01,
        },
    }
    text = tracking.decisions(entry)
    first = text.splitlines()[0]
    assert first.startswith("- Against **paper p=100 (|cos| 0.500")
    assert (
        "no more products per step: cheap and better (|cos| 0.600, top-2 capture 0.600, "
        "0.050 products/step, step time 1.110× SAM's): +0.100 ± " in first
    )
    assert "not on every seed" not in first  # its interval contains 0
    assert "more products (" not in first  # 0.06 > 0.052 products per step
    assert "paper p=20" not in text  # no row of it
    assert "at step time ≤ 1.05× SAM's): **not met**. Best tracking at ≤ 1.05×: better on " in text
    assert "Best tracking at any cost: better but more products (|cos| 0.923" in text
    # The alternative goal: top-2 capture ≥ 0.9 (v₁ near-degenerate) at no more than 1.05.
    for summary in per_seed.values():
        summary["cheap and worse"]["capture2"] = 0.95
    entry["tracking"] = tracking.aggregate(per_seed)
    text = tracking.decisions(entry)
    assert "≤ 1.05× SAM's): met by cheap and worse." in text
    assert "best top-2 capture: cheap and worse (|cos| 0.400, top-2 capture 0.950" in text


def test_snippet_sections_are_included_by_name_and_dropped_from_the_whole_file(
    tmp_path,
) -> None:
    from markdown import Markdown

    from eigensam.lab.experiments.report import snippet

    (tmp_path / "section.md").write_text(
        "before\n\n" + snippet("vit-small", "inside") + "\n\nafter\n", encoding="utf-8"
    )

    def render(include: str) -> str:
        md_config = {"pymdownx.snippets": {"base_path": [str(tmp_path)]}}
        md = Markdown(extensions=["pymdownx.snippets"], extension_configs=md_config)
        return md.convert(f'--8<-- "{include}"\n')

    part = render("section.md:vit-small")
    assert "inside" in part and "before" not in part and "after" not in part
    whole = render("section.md")
    assert "before" in whole and "inside" in whole and "after" in whole
    assert "8<--" not in whole


def test_model_summary_reads_each_seeds_cached_study(tmp_path) -> None:
    """The study of seed S is cached in ``study-{model}-seed{S}``; the summary averages the
    seeds' summaries and pools every seed's λ₂/λ₁ (no training: every cache is written here)."""
    import json

    def observations(cos: float, gap: float) -> dict[str, object]:
        entry = {"abs_cos": cos, "capture": [cos, 0.9, 0.95, 0.97, 1.0]}
        measurement = {"estimators": {"a": entry}, "eigenvalues": [2.0, 2.0 * gap]}
        return {
            "steps": 40,
            "sample": 16,
            "measure_every": 10,
            "products": {"a": 4},
            "measurements": [measurement, measurement],
        }

    scale = make_scale("cpu", tmp_path, seeds=(4, 7, 9, 11))
    assert tracking.study_seeds(scale, "vit-small") == (4, 7, 9)
    for seed, (cos, gap) in {4: (0.2, 0.5), 7: (0.4, 0.7), 9: (0.9, 0.9)}.items():
        folder = tmp_path / f"study-vit-small-seed{seed}"
        folder.mkdir()
        (folder / "observations.json").write_text(json.dumps(observations(cos, gap)))
    (tmp_path / "timing-vit-small.json").write_text(json.dumps({"sam": 0.1, "a": 1.2}))
    summary = tracking.model_summary(scale, "vit-small", tmp_path)
    assert list(summary["per_seed"]) == [4, 7, 9]
    assert summary["tracking"]["a"]["abs_cos"] == pytest.approx(0.5)
    assert summary["tracking"]["a"]["products_per_step"] == pytest.approx(0.1)
    assert sorted(summary["gaps"]) == pytest.approx([0.5, 0.5, 0.7, 0.7, 0.9, 0.9])
    assert summary["timing"] == {"sam": 0.1, "a": 1.2}
