"""The statistics behind every verdict of the reproduction report: the rules that turn a 95%
interval into a verdict, and the power of each comparison.

**Verdict rules** (:func:`verdict`), for a claim that an effect ``d`` (a paired difference over
seeds, or a mean against a threshold) has the paper's sign ``s`` (and, where the paper gives a
number, the size ``δ``), measured as a 95% Student-t interval ``[lo, hi]``:

- *reproduces*: the estimate has sign ``s`` and the interval excludes 0;
- *contradicted*: the interval excludes 0 with the opposite sign, or it excludes the paper's
  effect ``δ`` (only when the paper gives one);
- *inconclusive*: the interval contains 0 (and ``δ``, when given): the data cannot tell the
  paper's effect from none; the minimum detectable effect says how large an effect would have
  been found;
- *not testable on CPU*: the claim needs models, data or hardware the scale lacks.

**Power** (:func:`min_detectable_effect`): a paired t-test over ``n`` seeds whose differences
have standard deviation ``σ_d`` detects, with power ``1 − β`` at two-sided level ``α``, effects of
at least

    MDE = (t_{1−α/2, n−1} + t_{1−β, n−1}) · σ_d / √n

(the usual t-approximation of the noncentral-t power; with normal quantiles it is
``(z_{1−α/2} + z_{1−β})·σ_d/√n = 2.8016·σ_d/√n`` at α = 0.05, β = 0.2). The report uses the
t form, which is larger at small ``n``; :func:`seeds_needed` is the smallest ``n`` whose MDE,
at the measured ``σ_d``, is at most the paper's effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from eigensam.lab.engine.run_folder import t_central

REPRODUCES = "reproduces"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"
NOT_TESTABLE = "not testable on CPU"
VERDICTS = (REPRODUCES, CONTRADICTED, INCONCLUSIVE, NOT_TESTABLE)

ALPHA = 0.05  # two-sided level of every test
POWER = 0.8  # power at which the minimum detectable effect is quoted
# Normal quantiles z_{0.975} and z_{0.8} (the normal approximation, for comparison).
Z_975 = 1.959963984540054
Z_80 = 0.8416212335729143
MAX_SEEDS = 100_000


def t_quantile(p: float, df: int) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom, ``0.5 ≤ p < 1``:
    solves ``P(|T| ≤ t) = 2p − 1``
    (:func:`eigensam.lab.engine.run_folder.t_central`, closed form) by
    bisection to machine precision. Closed forms to check it against: ``tan(π(p − ½))`` for
    ``df = 1`` and ``(2p − 1)/√(2p(1 − p))`` for ``df = 2``."""
    if not (isinstance(p, int | float) and 0.5 <= p < 1):
        raise ValueError(f"p must be a probability in [0.5, 1), got {p!r}")
    target = 2 * p - 1
    low, high = 0.0, 1.0
    while t_central(high, df) < target:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if mid in (low, high):
            break
        low, high = (mid, high) if t_central(mid, df) < target else (low, mid)
    return (low + high) / 2


def min_detectable_effect(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """``(t_{1−α/2,n−1} + t_{power,n−1})·sd/√n``: the smallest true mean difference a
    two-sided paired t-test at level ``alpha`` over ``n`` pairs with difference standard
    deviation ``sd`` detects with probability ``power`` (see the module docstring)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2 (a paired test needs two pairs), got {n!r}")
    if not (math.isfinite(sd) and sd >= 0):
        raise ValueError(f"sd must be a finite standard deviation >= 0, got {sd!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    if not 0.5 <= power < 1:
        raise ValueError(f"power must lie in [0.5, 1), got {power!r}")
    quantiles = t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)
    return quantiles * sd / math.sqrt(n)


def min_detectable_effect_normal(sd: float, n: int) -> float:
    """The normal approximation ``(z_{0.975} + z_{0.8})·sd/√n`` of :func:`min_detectable_effect`
    at α = 0.05, 80% power (smaller than the t form; equal as ``n → ∞``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return (Z_975 + Z_80) * sd / math.sqrt(n)


def seeds_needed(sd: float, effect: float) -> int | None:
    """The smallest number of seeds ``n ≥ 2`` whose :func:`min_detectable_effect` at ``sd`` is
    at most ``|effect|``; None when ``effect`` is 0 or more than :data:`MAX_SEEDS` would be
    needed."""
    if effect == 0:
        return None
    if sd == 0:
        return 2
    size = abs(effect)
    # The normal form is a lower bound of the t form: start the search where it is reached.
    n = max(2, math.ceil(((Z_975 + Z_80) * sd / size) ** 2))
    while n <= MAX_SEEDS:
        if min_detectable_effect(sd, n) <= size:
            return n
        n += 1
    return None


def seeds_needed_normal(sd: float, effect: float) -> int | None:
    """The closed form ``⌈((z_{0.975} + z_{0.8})·sd/effect)²⌉`` of the seeds a paired test
    needs to detect ``effect`` at 80% power (two-sided 5%), from the normal approximation: a
    lower bound of :func:`seeds_needed` (the t form adds a seed or two at small ``n``). None for
    an effect of 0."""
    if effect == 0:
        return None
    return max(2, math.ceil(((Z_975 + Z_80) * sd / abs(effect)) ** 2))


@dataclass(frozen=True)
class PowerPlan:
    """The power analysis of one paired comparison: at the paired standard deviation ``sd``,
    ``n`` seeds detect effects of at least ``mde`` (80% power, two-sided 5%); ``needed`` seeds
    (t form; ``needed_normal``, the closed normal form) would detect the paper's ``effect``."""

    sd: float
    effect: float
    n: int
    mde: float
    needed: int | None
    needed_normal: int | None

    @property
    def powered(self) -> bool:
        """Whether ``n`` seeds reach 80% power for ``effect`` (MDE ≤ |effect|)."""
        return self.mde <= abs(self.effect)

    def cpu_hours(self, seconds_per_seed: float) -> float | None:
        """CPU-hours of the seeds still missing to reach ``needed``, at ``seconds_per_seed``
        (the runs of one seed of the comparison); None when ``needed`` is unknown."""
        if self.needed is None:
            return None
        return max(0, self.needed - self.n) * seconds_per_seed / 3600


def plan_power(sd: float, effect: float, n: int) -> PowerPlan:
    """The :class:`PowerPlan` of a paired comparison with difference SD ``sd`` over ``n`` seeds
    against the paper's ``effect``."""
    return PowerPlan(
        sd,
        effect,
        n,
        min_detectable_effect(sd, n),
        seeds_needed(sd, effect),
        seeds_needed_normal(sd, effect),
    )


@dataclass(frozen=True)
class Evidence:
    """A measured effect: estimate, half-width of its 95% interval (None below two values),
    number of seeds (pairs) and the standard deviation of the per-seed values (differences)."""

    estimate: float
    half_width: float | None
    n: int
    sd: float | None

    @property
    def low(self) -> float:
        return self.estimate - (self.half_width or 0.0)

    @property
    def high(self) -> float:
        return self.estimate + (self.half_width or 0.0)

    def mde(self) -> float | None:
        """Minimum detectable effect at this ``n`` and ``sd`` (None below two seeds)."""
        if self.n < 2 or self.sd is None:
            return None
        return min_detectable_effect(self.sd, self.n)


def verdict(evidence: Evidence, sign: int, paper_effect: float | None = None) -> str:
    """The verdict of the module docstring's rules for a claim that the effect has ``sign``
    (+1 or −1) and, if given, the size ``paper_effect`` (signed, the paper's value of the same
    quantity). Fewer than two seeds give no interval: *inconclusive*."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    if paper_effect is not None and (paper_effect == 0 or math.copysign(1, paper_effect) != sign):
        raise ValueError(
            f"paper_effect must be nonzero with the claim's sign {sign:+d}, got {paper_effect!r}"
        )
    if evidence.half_width is None:
        return INCONCLUSIVE
    low, high = evidence.low, evidence.high
    excludes_zero = low > 0 or high < 0
    if excludes_zero and math.copysign(1, evidence.estimate) == sign:
        return REPRODUCES
    if excludes_zero:
        return CONTRADICTED  # significant, with the opposite sign
    if paper_effect is not None and not low <= paper_effect <= high:
        return CONTRADICTED
    return INCONCLUSIVE
