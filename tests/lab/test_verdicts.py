"""The verdict rules on constructed intervals, and the minimum detectable effect against closed
forms (Student's t quantiles for 1 and 2 degrees of freedom, the normal limit) and against the
exact noncentral-t power (scipy, where installed)."""

from __future__ import annotations

import math

import pytest

from eigensam.lab.experiments import verdicts
from eigensam.lab.experiments.report import bound_claim, claims_table, paired_claim
from eigensam.lab.experiments.verdicts import (
    CONTRADICTED,
    INCONCLUSIVE,
    REPRODUCES,
    Evidence,
    min_detectable_effect,
    min_detectable_effect_normal,
    seeds_needed,
    t_quantile,
    verdict,
)


def interval(low: float, high: float, n: int = 5) -> Evidence:
    return Evidence((low + high) / 2, (high - low) / 2, n, 1.0)


@pytest.mark.parametrize(
    ("low", "high", "sign", "paper", "expected"),
    [
        (0.1, 0.5, 1, 0.2, REPRODUCES),  # paper's sign, excludes 0
        (0.1, 0.15, 1, 0.9, REPRODUCES),  # excludes 0 with the paper's sign, smaller than paper
        (-0.5, -0.1, -1, None, REPRODUCES),
        (-0.5, -0.1, 1, 0.2, CONTRADICTED),  # significant opposite sign
        (-0.5, -0.1, 1, None, CONTRADICTED),
        (-0.3, 0.1, 1, 0.2, CONTRADICTED),  # holds 0, excludes the paper's +0.2
        (-0.75, 0.93, 1, 0.2, INCONCLUSIVE),  # the issue's +0.09 ± 0.84 against +0.2
        (-0.3, 0.1, 1, None, INCONCLUSIVE),  # no size claimed: holding 0 decides nothing
        (0.0, 0.4, 1, 0.2, INCONCLUSIVE),  # an end at exactly 0 does not exclude it
    ],
)
def test_verdict_rules_on_constructed_intervals(low, high, sign, paper, expected):
    assert verdict(interval(low, high), sign, paper) == expected


def test_verdict_without_an_interval_and_bad_arguments():
    assert verdict(Evidence(1.0, None, 1, None), 1) == INCONCLUSIVE
    with pytest.raises(ValueError, match="sign must be"):
        verdict(interval(0, 1), 0)
    with pytest.raises(ValueError, match="paper_effect must be nonzero with the claim's sign"):
        verdict(interval(0, 1), 1, -0.2)


def test_t_quantile_matches_closed_forms():
    for p in (0.6, 0.8, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), 1e-12)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764451051977987, rel=1e-10)  # tables
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(0.3, 3)


def test_minimum_detectable_effect_closed_form_and_normal_limit():
    # n = 3 pairs (df 2): (t_.975 + t_.8)·sd/√3 with both quantiles in closed form.
    closed = (
        (0.95 / math.sqrt(2 * 0.975 * 0.025) + 0.6 / math.sqrt(2 * 0.8 * 0.2)) * 2 / math.sqrt(3)
    )
    assert min_detectable_effect(2.0, 3) == pytest.approx(closed, rel=1e-12)
    assert min_detectable_effect_normal(1.0, 1) == pytest.approx(2.8015852181, rel=1e-9)
    # The t form exceeds the normal one and meets it as n grows.
    assert min_detectable_effect(1.0, 5) > min_detectable_effect_normal(1.0, 5)
    ratio = min_detectable_effect(1.0, 4000) / min_detectable_effect_normal(1.0, 4000)
    assert ratio == pytest.approx(1.0, abs=1e-3)
    for bad in ({"sd": 1.0, "n": 1}, {"sd": -1.0, "n": 5}, {"sd": float("nan"), "n": 5}):
        with pytest.raises(ValueError, match="n must|sd must"):
            min_detectable_effect(**bad)


def test_minimum_detectable_effect_has_about_80_percent_exact_power():
    stats = pytest.importorskip("scipy.stats")
    for n in (3, 5, 10, 30):
        df = n - 1
        shift = min_detectable_effect(1.0, n) * math.sqrt(n)  # noncentrality at the MDE
        crit = stats.t.ppf(0.975, df)
        power = stats.nct.sf(crit, df, shift) + stats.nct.cdf(-crit, df, shift)
        assert 0.76 < power < 0.805  # the t-approximation is slightly optimistic at small n


def test_seeds_needed_is_the_smallest_sufficient_n():
    n = seeds_needed(0.68, 0.2)
    assert min_detectable_effect(0.68, n) <= 0.2 < min_detectable_effect(0.68, n - 1)
    assert seeds_needed(0.68, -0.9) == seeds_needed(0.68, 0.9)
    assert seeds_needed(0.0, 0.5) == 2 and seeds_needed(1.0, 0.0) is None
    assert seeds_needed(1.0, 1e-4) is None  # beyond MAX_SEEDS
    assert verdicts.MAX_SEEDS < (2.8 / 1e-4) ** 2


def test_paired_claim_reports_power_and_three_way_verdict():
    sam = [78.0, 79.0, 77.5, 78.5, 78.0]
    eig = [78.5, 78.4, 78.4, 78.0, 78.9]  # differences +0.5 −0.6 +0.9 −0.5 +0.9
    claim = paired_claim("eigen > sam", "+0.2", eig, sam, expect=1, paper_effect=0.2, digits=2)
    diffs = [e - s for e, s in zip(eig, sam, strict=True)]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    assert claim.verdict == INCONCLUSIVE
    assert claim.power.n == 5 and claim.power.sd == pytest.approx(sd)
    assert claim.power.mde == pytest.approx(min_detectable_effect(sd, 5))
    assert claim.power.needed == seeds_needed(sd, 0.2)
    row = claims_table([claim]).splitlines()[-1]
    assert f"| 5 | {sd:.2f} | {claim.power.mde:.2f} | {claim.power.needed} |" in row
    worse = paired_claim("eigen > sam", "+0.2", sam, [s + 1.0 for s in sam], expect=1)
    assert worse.verdict == CONTRADICTED


def test_bound_claim_three_ways():
    assert bound_claim("c", "p", [0.1, 0.12, 0.09], below=0.5).verdict == REPRODUCES
    assert bound_claim("c", "p", [0.9, 0.92, 0.89], below=0.5).verdict == CONTRADICTED
    assert bound_claim("c", "p", [0.1, 0.9, 0.5], below=0.5).verdict == INCONCLUSIVE


@pytest.mark.parametrize(("sd", "effect"), [(0.65, 0.5), (0.75, 0.2), (0.3, 0.2), (1.2, 0.3)])
def test_planner_seeds_against_the_closed_form(sd, effect):
    """The normal closed form n = ⌈((z_.975 + z_.8)·σ/δ)²⌉ (2.8016² = 7.849), and the t form
    it bounds from below by at most two seeds here."""
    closed = math.ceil(7.84888 * sd**2 / effect**2)
    plan = verdicts.plan_power(sd, effect, 5)
    assert plan.needed_normal == closed
    assert closed <= plan.needed <= closed + 2
    assert (
        min_detectable_effect(sd, plan.needed)
        <= effect
        < min_detectable_effect(sd, plan.needed - 1)
    )
    assert plan.mde == pytest.approx(min_detectable_effect(sd, 5))
    assert plan.powered == (plan.needed <= 5)
    assert plan.cpu_hours(360.0) == pytest.approx(max(0, plan.needed - 5) * 0.1)


def test_planner_mde_reached_with_n_seeds():
    # 16 seeds at SD 0.65: (t_.975,15 + t_.8,15)·0.65/4 = (2.13145 + 0.86624)·0.1625.
    plan = verdicts.plan_power(0.65, 0.5, 16)
    assert plan.mde == pytest.approx((2.131449546 + 0.866245) * 0.65 / 4, rel=1e-5)
    assert plan.powered and plan.cpu_hours(100.0) == 0
    assert verdicts.seeds_needed_normal(1.0, 0.0) is None
