"""Claims as data: the judge turns specs and per-seed measurements into report rows, one verdict
per comparison against the paper's closest figure, other figures quoted (no training)."""

from __future__ import annotations

import math

import pytest

from eigensam.lab.experiments import reproduce
from eigensam.lab.experiments.claims import (
    POINTS,
    Below,
    Compare,
    Paper,
    PerSeed,
    Untestable,
    judge,
    paper_text,
)
from eigensam.lab.experiments.verdicts import (
    CONTRADICTED,
    INCONCLUSIVE,
    NOT_TESTABLE,
    REPRODUCES,
    min_detectable_effect,
    seeds_needed,
)

FMNIST = Paper(0.2, "ResNet-18, Fashion-MNIST, Table 1", "95.6 vs 95.4")
CIFAR100 = Paper(0.9, "ResNet-18, CIFAR-100, §6.4")


def measured(diffs: list[float], base: float = 0.80) -> PerSeed:
    """Eigen-SAM and SAM accuracies whose per-seed differences are ``diffs`` (fractions)."""
    return PerSeed(
        {
            "sam": {s: {"acc": base} for s in range(len(diffs))},
            "eigen-sam": {s: {"acc": base + d} for s, d in enumerate(diffs)},
        }
    )


def spec(**changes) -> Compare:
    fields = dict(claim="Eigen-SAM beats SAM", a="eigen-sam", b="sam", metric="acc", sign=1)
    return Compare(**{**fields, "paper": FMNIST, "context": (CIFAR100,), **POINTS, **changes})


def test_one_verdict_against_the_closest_setting_others_quoted():
    """The issue's case: an interval (−0.07 ± 0.89 points) that holds the paper's +0.2
    (Fashion-MNIST) and ends just below CIFAR-100's +0.9: judged once, against +0.2,
    inconclusive; +0.9 is quoted, not judged."""
    diffs = [0.0080, -0.0050, 0.0050, -0.0095, -0.0018]  # points: +0.80 −0.50 +0.50 −0.95 −0.18
    (row,) = judge([spec()], measured(diffs))
    assert row.verdict == INCONCLUSIVE
    assert row.paper.startswith("+0.2 (95.6 vs 95.4; ResNet-18, Fashion-MNIST, Table 1)")
    assert "for context: +0.9 (ResNet-18, CIFAR-100, §6.4)" in row.paper
    # Judged against +0.9 instead, the same data would be contradicted: the context is not.
    (against_cifar,) = judge([spec(paper=CIFAR100, context=())], measured(diffs))
    upper = float(against_cifar.measured.split()[1]) + float(against_cifar.measured.split()[3])
    assert upper < 0.9 and against_cifar.verdict == CONTRADICTED


def test_the_judge_computes_power_from_the_paired_differences():
    diffs = [0.004, 0.006, 0.001, 0.005, 0.003]
    (row,) = judge([spec()], measured(diffs))
    points = [100 * d for d in diffs]
    mean = sum(points) / 5
    sd = math.sqrt(sum((p - mean) ** 2 for p in points) / 4)
    assert row.verdict == REPRODUCES
    assert row.measured.startswith(f"difference +{mean:.2f} ± ")
    assert row.power.n == 5 and row.power.sd == pytest.approx(sd)
    assert row.power.mde == pytest.approx(min_detectable_effect(sd, 5))
    assert row.power.needed == seeds_needed(sd, 0.2)


def test_opposite_sign_is_contradicted_and_direction_only_claims():
    (row,) = judge([spec()], measured([-0.005, -0.004, -0.006, -0.005]))
    assert row.verdict == CONTRADICTED
    no_size = spec(paper=Paper(None, "Fig. 3 right", "smaller"), context=())
    (row,) = judge([no_size], measured([-0.001, 0.002, 0.0, 0.001]))
    assert row.verdict == INCONCLUSIVE and row.power.needed is None
    assert row.paper == "smaller; Fig. 3 right"


def test_a_comparison_decided_elsewhere_has_no_verdict_here():
    (row,) = judge([spec(decided_by="decide")], measured([0.004, 0.006, 0.001]))
    assert row.verdict == "decided by decide" and row.power.n == 3


def test_bounds_and_untestable_claims():
    data = PerSeed({"sam": {0: {"align": 0.1}, 1: {"align": 0.12}, 2: {"align": 0.09}}})
    paper = Paper(None, "Fig. 1 left", "poor alignment")
    below = Below("Align is low", "sam", "align", 0.5, paper)
    above = Below("Align is low", "sam", "align", 0.05, paper)
    untestable = Untestable("ViT-B-16", Paper(0.1, "CIFAR-10"), "needs a GPU")
    rows = judge([below, above, untestable], data)
    assert [r.verdict for r in rows] == [REPRODUCES, CONTRADICTED, NOT_TESTABLE]
    assert rows[2].paper == "+0.1 (CIFAR-10)" and rows[2].measured == "needs a GPU"


def test_per_seed_measurements_pair_only_common_seeds():
    data = PerSeed({"a": {0: {"x": 1.0}, 2: {"x": 3.0}}, "b": {2: {"x": 1.0}, 1: {"x": 0.0}}})
    assert data.paired("a", "b", "x") == ([3.0], [1.0])
    assert data.values("a", "x") == [1.0, 3.0] and data.values("c", "x") == []
    assert paper_text(FMNIST) == "+0.2 (95.6 vs 95.4; ResNet-18, Fashion-MNIST, Table 1)"


def test_no_comparison_gets_two_verdicts_in_the_report(tmp_path):
    """Across every target's specs, a (runs, metric) comparison is judged at most once: the
    same pair of run groups on the same metric appears with a verdict in one spec only."""
    from eigensam.lab.experiments.claims import Compare as CompareSpec
    from eigensam.lab.experiments.runs import make_scale

    scale = make_scale("cpu", tmp_path)
    judged: dict[tuple, str] = {}
    for target in reproduce.TARGETS.values():
        specs = getattr(target, "specs", ())
        if not specs:
            continue
        plan = target.plan(scale)
        for s in specs:
            if not isinstance(s, CompareSpec) or s.decided_by is not None:
                continue
            if s.a not in plan or s.b not in plan:
                continue
            metric = "accuracy" if s.metric in ("test_acc", "held_out_acc") else s.metric
            key = (
                tuple(c.run_dir for c in plan[s.a]),
                tuple(c.run_dir for c in plan[s.b]),
                metric,
            )
            first = {c.run_dir for c in plan[s.a]} | {c.run_dir for c in plan[s.b]}
            for (a, b, other), owner in judged.items():
                if other == metric and set(a) & first and set(b) & first:
                    raise AssertionError(f"{target.name}: {s.claim!r} is judged by {owner} too")
            judged[key] = f"{target.name}: {s.claim}"
    assert judged
