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
    paper = tracking.make_rule(tracking.PAPER)
    assert isinstance(paper, BurstPower) and (paper.interval, paper.iters) == (20, 5)
    name, interval, iters, options = tracking.ESTIMATORS[tracking.DEFAULT_LABEL]
    # the row labelled as the library's default is its rule at its own budget
    assert (name, (interval, iters), options) == (DEFAULT_ESTIMATOR, default_budget(name), {})


def test_plan_runs_sam_the_papers_eigen_sam_and_the_best_tracker(tmp_path) -> None:
    scale = make_scale("cpu", tmp_path, seeds=(0, 1))
    plan = tracking.plan(scale)
    assert list(plan) == list(tracking.METHODS)
    paper, other = plan["eigen-sam"][0], plan[tracking.OUTCOME][0]
    assert paper.eig_estimator == "power" and paper.eig_interval == 20
    name, interval, iters, _ = tracking.ESTIMATORS[tracking.OUTCOME_LABEL]
    assert (other.eig_estimator, other.eig_interval, other.eig_iters) == (name, interval, iters)
    # The paper's runs are the headline's (the same run folders).
    assert plan["eigen-sam"][0].run_dir.name == "eigen-sam-seed0"
    with pytest.raises(ValueError, match="CPU scale"):
        tracking.plan(make_scale("paper", tmp_path))


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


def test_decisions_list_the_estimators_that_beat_the_paper_at_no_more_cost() -> None:
    def row(cos: float, capture2: float | None = None) -> dict[str, float]:
        return {"abs_cos": cos, "capture2": cos if capture2 is None else capture2}

    entry = {
        "tracking": {
            "paper p=100": row(0.5),
            "cheap and better": row(0.6),
            "better but dearer": row(0.9),
            "cheap and worse": row(0.4),
        },
        "timing": {
            "paper p=100": 1.10,
            "cheap and better": 1.05,
            "better but dearer": 1.30,
            "cheap and worse": 1.01,
        },
    }
    text = tracking.decisions(entry)
    assert "no more measured cost: cheap and better (0.600 at 1.050)." in text
    assert "Best tracking measured: better but dearer" in text
    assert "step time ≤ 1.05× SAM's: none" in text  # 0.6 < 0.8 and capture 0.6 < 0.9
    # The alternative goal: top-2 capture ≥ 0.9 (v₁ near-degenerate) at no more than 1.05.
    entry["tracking"]["cheap and worse"] = row(0.4, capture2=0.95)
    text = tracking.decisions(entry)
    assert "best top-2 capture: cheap and worse (0.950 at 1.010× SAM's)" in text
    assert "step time ≤ 1.05× SAM's: cheap and worse." in text


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
