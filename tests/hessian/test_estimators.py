"""The eigenvector estimators on quadratics with a known, rotating Hessian.

``H(t) = Q(t) Λ Q(t)ᵀ`` in ``d = 12`` dimensions, ``Λ = diag(4, 1, 0.8, …, 0.1)`` (positive
definite, ``r = λ₂/λ₁ = 1/4``, ``κ = (λ₁ − λ_d)/(λ₁ − λ₂) = 1.3``), ``Q(t) = R·G(ωt)`` with ``R``
a fixed random rotation and ``G`` the rotation by ``ωt`` in the plane of the first two axes: the
top eigenvector ``v₁(t) = R(cos ωt, sin ωt, 0, …)`` turns by exactly ``ω`` per step.

The tolerances, derived (``φ`` the angle of the estimate to ``v₁`` before a refresh, ``φ'``
after it):

- power iteration, ``q`` products on a positive definite ``H``: each product multiplies the
  ``v₁`` component by ``λ₁`` and the others by at most ``λ₂``: ``tan φ' ≤ r^q tan φ``;
- Lanczos, ``q`` products: its Krylov space holds the power iterate ``u = H^{q−1}v₀``, so its top
  Ritz vector ``y`` has ``vᵀHv ≥ uᵀHu``; with ``λ₁ − uᵀHu ≤ (λ₁ − λ_d) sin²∠u`` and
  ``λ₁ − yᵀHy ≥ (λ₁ − λ₂) sin²∠y``: ``sin φ' ≤ √κ sin(atan(r^{q−1} tan φ))``;
- block subspace iteration (one round): the top Ritz vector of the block beats ``v̂`` itself in
  Rayleigh quotient (``sin ∠y ≤ √κ sin φ``), and ``v̂' ∝ H y``: ``tan φ' ≤ r tan ∠y``;
- averaged power with momentum ``β``: ``m' = β m + (1 − β) H m/‖m‖ = (βI + cH) m`` with
  ``c ≥ (1 − β)/λ₁`` (``m`` is a convex combination of products ``Hv``, ``‖Hv‖ ≤ λ₁``), so
  ``tan φ' ≤ (β + (1 − β) r) tan φ``;
- the adaptive refresh spends at least one power product: ``tan φ' ≤ r tan φ``.

Between refreshes a rule that spends no product keeps ``v̂`` while ``v₁`` turns by ``ω`` a step.
So the angle just before refresh ``k + 1`` is at most ``Θ_{k+1} = f(Θ_k) + ω·stride``, and in
steady state at most the fixed point ``Θ* = f(Θ*) + ω·stride``: the tests check every refresh
against ``f`` and every step after the burn-in against ``Θ*``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from eigensam.hessian.eigen import WholeVectors
from eigensam.hessian.estimators import (
    ESTIMATORS,
    AdaptiveRefresh,
    AveragedPower,
    BlockPower,
    BurstLanczos,
    BurstPower,
    Estimator,
    Products,
    Secant,
    default_budget,
    make_estimator,
)
from eigensam.hessian.tracker import EigenTracker

D = 12
LAMBDA = torch.tensor([4.0, 1.0, *torch.linspace(0.8, 0.1, D - 2).tolist()], dtype=torch.float64)
R_GAP = float(LAMBDA[1] / LAMBDA[0])
KAPPA = float((LAMBDA[0] - LAMBDA[-1]) / (LAMBDA[0] - LAMBDA[1]))
ROTATION = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)).double())[
    0
]


def basis(t: int, omega: float) -> Tensor:
    g = torch.eye(D, dtype=torch.float64)
    c, s = math.cos(omega * t), math.sin(omega * t)
    g[0, 0], g[0, 1], g[1, 0], g[1, 1] = c, -s, s, c
    return ROTATION @ g


def hessian(t: int, omega: float) -> Tensor:
    q = basis(t, omega)
    return q @ torch.diag(LAMBDA) @ q.T


def angle(v: Tensor, t: int, omega: float) -> float:
    cos = abs(float(v @ basis(t, omega)[:, 0])) / float(v.norm())
    return math.acos(min(1.0, cos))


def contraction(rule: Estimator) -> Callable[[float], float]:
    """The derived bound ``φ ↦ φ'`` of one (non-first) refresh of ``rule``."""

    def power(q: int) -> Callable[[float], float]:
        return lambda phi: math.atan(R_GAP**q * math.tan(phi))

    def ritz(phi: float) -> float:
        return math.asin(min(1.0, math.sqrt(KAPPA) * math.sin(phi)))

    if isinstance(rule, BlockPower):
        return lambda phi: power(1)(ritz(phi))
    if isinstance(rule, AveragedPower):
        factor = rule.momentum + (1 - rule.momentum) * R_GAP
        return lambda phi: math.atan(factor * math.tan(phi))
    if isinstance(rule, AdaptiveRefresh) or rule.name == "spread":
        return power(1)
    if rule.name.startswith("lanczos"):
        return lambda phi: ritz(power(rule.iters - 1)(phi))
    return power(rule.iters)


def steady_state(rule: Estimator, omega: float) -> float:
    """The fixed point ``Θ* = f(Θ*) + ω·stride`` (iterated from a small angle: ``f`` is a
    contraction near 0)."""
    f, theta = contraction(rule), 0.0
    for _ in range(1000):
        theta = f(theta) + omega * rule.stride
    return theta


class Run:
    """``rule`` driven over ``steps`` steps of the rotating quadratic: refreshes where due, and
    the free product along a gradient direction ``ĝ ∝ H(t)x`` (``x`` random) every step."""

    def __init__(self, rule: Estimator, omega: float, steps: int, seed: int = 1):
        self.rule, self.omega = rule, omega
        gen = torch.Generator().manual_seed(seed)

        drawn: list[Tensor] = []

        def random() -> Tensor:
            v = torch.randn(D, generator=gen, dtype=torch.float64)
            drawn.append(v / v.norm())
            return drawn[-1]

        self.v: Tensor | None = None
        self.angles: list[float] = []  # after step t's refresh/observation, against v₁(t)
        self.refreshes: list[tuple[float, float]] = []  # (before, after)
        for t in range(steps):
            h = hessian(t, omega)
            if rule.due(t):
                first = self.v is None
                start = random() if self.v is None else self.v
                before = angle(start, t, omega)
                drawn.clear()
                result = rule.refresh(
                    start, first, Products(lambda x, h=h: h @ x, WholeVectors(D), random)
                )
                self.v = result.eigenvector / result.eigenvector.norm()
                if rule.name == "lanczos-cold":  # it started from its own draw
                    before = angle(drawn[0], t, omega)
                if not first:
                    self.refreshes.append((before, angle(self.v, t, omega)))
            x = torch.randn(D, generator=gen, dtype=torch.float64)
            d = h @ x
            d = d / d.norm()
            new = rule.observe(self.v, d, h @ d, WholeVectors(D))
            if new is not None:
                self.v = new / new.norm()
            if self.v is not None:
                self.angles.append(angle(self.v, t, omega))


POWER_LIKE = [
    lambda: make_estimator("power", 20, 5),
    lambda: make_estimator("power", 100, 5),
    lambda: make_estimator("lanczos", 20, 5),
    lambda: make_estimator("lanczos-cold", 20, 5),
    lambda: make_estimator("spread", 20, 5),
    lambda: make_estimator("averaged", 20, 5, momentum=0.7),
    lambda: make_estimator("block", 20, 4, block=2),
    lambda: make_estimator("block", 20, 4, block=4),
    lambda: make_estimator("adaptive", 20, 5, threshold=0.05),
]


@pytest.mark.parametrize("make", POWER_LIKE)
def test_estimator_follows_rotating_top_eigenvector_within_derived_bound(
    make: Callable[[], Estimator],
) -> None:
    rule = make()
    omega = 0.002
    run = Run(rule, omega, 600)
    f = contraction(rule)
    for before, after in run.refreshes:  # every refresh contracts as derived
        assert after <= f(before) + 1e-9
    bound = steady_state(rule, omega)
    tail = run.angles[len(run.angles) // 2 :]
    assert max(tail) <= bound + 1e-9
    assert bound < 0.25  # the bound says something: |cos| ≥ 0.96


def test_lanczos_cold_start_ignores_the_estimate() -> None:
    """A cold Lanczos refresh draws its own start: its result does not depend on ``v̂``."""
    h = hessian(0, 0.0)
    draws = iter(torch.eye(D, dtype=torch.float64)[[3, 3]])
    rule = make_estimator("lanczos-cold", 20, 3)
    a = rule.refresh(
        torch.eye(D, dtype=torch.float64)[0],
        False,
        Products(h.__matmul__, WholeVectors(D), lambda: next(draws)),
    )
    b = rule.refresh(
        torch.eye(D, dtype=torch.float64)[5],
        False,
        Products(h.__matmul__, WholeVectors(D), lambda: next(draws)),
    )
    torch.testing.assert_close(a.eigenvector, b.eigenvector)


def test_secant_on_a_fixed_quadratic_raises_the_rayleigh_quotient_and_keeps_exact_products() -> (
    None
):
    """With exact free products on a fixed ``H``, Rayleigh–Ritz on ``span{v̂, d}`` never lowers
    ``v̂ᵀHv̂`` (``v̂`` is in the span) and ``m`` stays the exact ``H v̂`` (a linear combination
    of exact products): no refresh is needed to converge."""
    rule = Secant(None)
    run = Run(rule, 0.0, 200)
    h = hessian(0, 0.0)
    assert rule.product is not None and run.v is not None
    torch.testing.assert_close(rule.product / rule.product.norm(), (h @ run.v) / (h @ run.v).norm())
    quotients = []
    gen = torch.Generator().manual_seed(3)
    rule = Secant(None)
    v = None
    for _ in range(400):
        d = h @ torch.randn(D, generator=gen, dtype=torch.float64)
        d = d / d.norm()
        new = rule.observe(v, d, h @ d, WholeVectors(D))
        v = v if new is None else new / new.norm()
        assert v is not None
        quotients.append(float(v @ h @ v))
    assert all(b >= a - 1e-12 for a, b in zip(quotients, quotients[1:], strict=False))
    assert angle(v, 0, 0.0) < 0.01  # measured 0.003: it converges, slowly


def test_secant_with_refresh_contracts_at_every_refresh_on_a_rotating_quadratic() -> None:
    """A refresh spends ``q − 1`` power products and keeps the vector whose product it holds:
    ``tan φ' ≤ r^{q−1} tan φ`` (derived). Between refreshes the Rayleigh–Ritz steps use products
    up to ``p`` steps old, which no bound above covers; on this quadratic (ω = 0.002 rad/step)
    the measured steady state stays within 0.05 rad of ``v₁`` (stated, not derived)."""
    rule = Secant(20, 5)
    run = Run(rule, 0.002, 600)
    for before, after in run.refreshes:
        assert after <= math.atan(R_GAP**4 * math.tan(before)) + 1e-9
    assert max(run.angles[300:]) < 0.05


def test_secant_only_with_forgetting_follows_a_slowly_rotating_quadratic() -> None:
    """No product at all: discounting the stale ``v̂ᵀm`` (``forget``) lets fresh directions
    take over as ``H`` turns. Stated tolerance, measured on this quadratic: within 0.15 rad after
    the first 100 steps (without forgetting it stalls, far from ``v₁``)."""
    run = Run(Secant(None, forget=0.01), 0.002, 600)
    assert max(run.angles[100:]) < 0.15
    stalled = Run(Secant(None, forget=0.0), 0.002, 600)
    assert max(stalled.angles[100:]) > 0.5


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: make_estimator("block", block=0), "eig_block must be in"),
        (lambda: make_estimator("block", block=5), "eig_block must be in"),
        (lambda: make_estimator("adaptive", threshold=0.0), "eig_threshold must be a finite"),
        (lambda: make_estimator("adaptive", threshold=-1.0), "eig_threshold must be a finite"),
        (lambda: make_estimator("averaged", momentum=1.0), "momentum must be in"),
        (lambda: make_estimator("secant", forget=-0.1), "forget must be in"),
        (lambda: make_estimator("nope"), "eig_estimator must be one of"),
        (lambda: make_estimator("power", 0, 5), "eig_interval must be >= 1"),
        (lambda: make_estimator("power", 20, 0), "eig_iters must be >= 1"),
    ],
)
def test_bad_arguments_raise_one_clear_error(make: Callable[[], Estimator], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_argument_types_and_options() -> None:
    with pytest.raises(TypeError, match="eig_block must be an int"):
        make_estimator("block", block=2.0)
    with pytest.raises(TypeError, match="takes no option"):
        make_estimator("power", momentum=0.5)
    with pytest.raises(TypeError, match="eig_estimator must be a name"):
        EigenTracker(estimator=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="names the rule"):
        EigenTracker(estimator="averaged", method="lanczos")
    with pytest.raises(ValueError, match="eig_schedule='spread' needs eig_method='power'"):
        EigenTracker(method="lanczos", schedule="spread")
    with pytest.raises(ValueError, match="eig_method must be one of"):
        EigenTracker(method="arnoldi")
    with pytest.raises(ValueError, match="eig_estimator must be one of .* got 'oja'"):
        default_budget("oja")


@pytest.mark.parametrize(
    ("options", "rule", "budget"),
    [
        ({}, "power", (40, 2)),  # the library's default: warm power, 2 products / 40 steps
        ({"estimator": "paper"}, "power", (100, 5)),  # the paper's rule, one argument away
        ({"method": "power"}, "power", (100, 5)),  # the paper's family: the paper's budget
        ({"method": "power", "schedule": "burst", "estimator": "paper"}, "power", (100, 5)),
        ({"estimator": "power", "interval": 20, "iters": 5}, "power", (20, 5)),
        ({"method": "lanczos"}, "lanczos", (100, 5)),
        ({"schedule": "spread"}, "spread", (100, 5)),
        ({"estimator": "block", "interval": 20}, "block", (20, 5)),
        ({"estimator": "lanczos", "iters": 4}, "lanczos", (100, 4)),
    ],
)
def test_rule_and_budget_resolution(options: dict, rule: str, budget: tuple[int, int]) -> None:
    tracker = EigenTracker(**options)
    assert (tracker.rule.name, (tracker.interval, tracker.iters)) == (rule, budget)
    expected = {"power": BurstPower, "lanczos": BurstLanczos}.get(rule)
    assert expected is None or type(tracker.rule) is expected


@pytest.mark.parametrize("name", ESTIMATORS)
def test_state_dict_resumes_bit_exactly(name: str) -> None:
    """Stopping after step 37 and resuming from ``state_dict`` gives the same ``v̂`` as never
    stopping."""

    def drive(rule: Estimator, steps: range, v: Tensor | None) -> Tensor | None:
        gen = torch.Generator().manual_seed(steps.start)
        for t in steps:
            h = hessian(t, 0.002)

            def random() -> Tensor:
                return torch.randn(D, generator=gen, dtype=torch.float64)

            if rule.due(t):
                start = random() if v is None else v
                result = rule.refresh(
                    start / start.norm(), v is None, Products(h.__matmul__, WholeVectors(D), random)
                )
                v = result.eigenvector / result.eigenvector.norm()
            d = h @ torch.randn(D, generator=gen, dtype=torch.float64)
            new = rule.observe(v, d / d.norm(), h @ (d / d.norm()), WholeVectors(D))
            v = v if new is None else new / new.norm()
        return v

    whole = drive(make_estimator(name, 10, 3), range(0, 80), None)
    first = make_estimator(name, 10, 3)
    v = drive(first, range(0, 38), None)
    resumed = make_estimator(name, 10, 3)
    resumed.load_state_dict(first.state_dict())
    assert v is not None and whole is not None
    # The resumed half draws from its own generator seed: compare against the same split.
    split = make_estimator(name, 10, 3)
    v_split = drive(split, range(0, 38), None)
    assert v_split is not None
    assert torch.equal(
        drive(split, range(38, 80), v_split.clone()), drive(resumed, range(38, 80), v.clone())
    )


def test_extra_vectors_within_the_memory_budget() -> None:
    """The optimizer state beyond SAM is ``v̂`` plus the rule's vectors (plus ``g(w)`` during a
    step for rules on free products): at most 4 parameter-sized vectors."""
    for name in ESTIMATORS:
        rule = make_estimator(name, 20, 4, **({"block": 4} if name == "block" else {}))
        assert 1 + rule.extra_vectors + int(rule.uses_free_products) <= 4
