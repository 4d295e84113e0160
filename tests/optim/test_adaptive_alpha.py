"""Eigen-SAM's alpha="auto" (closed-form α for a target alignment) and the spread schedule."""

import math

import pytest
import torch
from conftest import quadratic

from eigensam import EigenSAM
from eigensam.hessian.metrics import align, cosine
from eigensam.hessian.tracker import EigenTracker
from eigensam.optim.eigen_sam import align_to_cos, auto_alpha


def eigen_sam_direction(g_hat, v, alpha):
    """Paper Eq. 8 written out: ĝ + α·sign(⟨ĝ,v⟩)·(v − ⟨v,ĝ⟩ĝ)."""
    c = torch.dot(g_hat, v)
    return g_hat + alpha * torch.sign(c) * (v - c * g_hat)


@pytest.mark.parametrize("grad_cos", [0.0, 0.05, -0.3, 0.6, 0.95])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.9, 0.999])
def test_auto_alpha_reaches_the_target_cosine(grad_cos, target):
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(50, generator=g, dtype=torch.float64), dim=0)
    other = torch.randn(50, generator=g, dtype=torch.float64)
    other -= torch.dot(other, v) * v
    other = torch.nn.functional.normalize(other, dim=0)
    g_hat = grad_cos * v + math.sqrt(1 - grad_cos**2) * other
    alpha = auto_alpha(grad_cos, target)
    reached = abs(cosine(eigen_sam_direction(g_hat, v, alpha), v))
    assert reached == pytest.approx(max(target, abs(grad_cos)), abs=1e-9)
    if abs(grad_cos) >= target:
        assert alpha == 0.0
    else:  # the smallest such α: a smaller one falls short
        assert abs(cosine(eigen_sam_direction(g_hat, v, 0.99 * alpha), v)) < target


def test_auto_alpha_one_over_cos_gives_exact_alignment():
    assert auto_alpha(0.25, 1.0) == pytest.approx(4.0)


def test_align_to_cos_inverts_the_align_metric():
    for target in (-0.4, 0.0, 0.5, 0.9):
        cos = align_to_cos(target)
        eps = torch.tensor([cos, math.sqrt(1 - cos**2)], dtype=torch.float64)
        assert align(eps, torch.tensor([1.0, 0.0], dtype=torch.float64)) == pytest.approx(target)


def test_eigen_sam_auto_alpha_step_reaches_target_align():
    a, b, w, closure, _ = quadratic([5.0, 2.0, 1.0, 0.5, 0.1])
    opt = EigenSAM(
        [w], torch.optim.SGD, rho=0.1, alpha="auto", target_align=0.5, alpha_max=100.0, lr=0.01
    )
    opt.step(closure)  # refreshes v̂ first, then uses it
    v = opt.tracker.vector
    grad = (a @ w.detach() + b).clone()
    assert align(grad, v) < 0.5  # the gradient alone is not aligned enough here
    eps = opt.perturbation(grad)
    assert opt.last_alpha > 0
    assert align(eps, v) == pytest.approx(0.5, abs=1e-9)
    assert float(eps.norm()) > 0.1  # ‖ε‖ = ρ·‖ĝ + α v̂⊥‖ ≥ ρ


def test_eigen_sam_auto_alpha_is_capped():
    _, _, w, closure, _ = quadratic([5.0, 2.0, 1.0])
    opt = EigenSAM(
        [w], torch.optim.SGD, rho=0.1, alpha="auto", target_align=0.99, alpha_max=0.3, lr=0.01
    )
    opt.step(closure)
    assert opt.last_alpha is not None and opt.last_alpha <= 0.3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(alpha="big"), "alpha must be a number >= 0 or 'auto'"),
        (dict(alpha="auto", target_align=1.0), "target_align must be in"),
        (dict(alpha="auto", target_align="x"), "target_align must be a number"),
        (dict(alpha="auto", alpha_max=-1.0), "alpha_max"),
    ],
)
def test_auto_alpha_bad_input(kwargs, match):
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises((ValueError, TypeError), match=match):
        EigenSAM([w], torch.optim.SGD, lr=0.1, **kwargs)


def test_auto_alpha_cannot_mix_with_numeric_group_alpha():
    w1, w2 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="every param group or by none"):
        EigenSAM(
            [{"params": [w1]}, {"params": [w2], "alpha": 0.1}],
            torch.optim.SGD,
            alpha="auto",
            lr=0.1,
        )


def test_spread_schedule_spends_the_same_products_per_interval():
    _, _, w, closure, q = quadratic([5.0, 2.0, 1.0, 0.5])
    burst = EigenTracker(interval=20, iters=5, method="power")
    spread = EigenTracker(interval=20, iters=5, schedule="spread")
    counts = {"burst": 0, "spread": 0}
    for step in range(60):
        for name, tracker in (("burst", burst), ("spread", spread)):
            if tracker.due(step):
                counts[name] += tracker.update(closure, [w]).num_matvecs
    # burst: 3 refreshes × 5; spread: a first full refresh (5), then 1 product every 4 steps.
    assert counts["burst"] == 15
    assert counts["spread"] == 5 + 14
    top = q[:, 0]
    assert abs(cosine(spread.vector, top)) > 0.999


def test_spread_schedule_needs_power_method():
    with pytest.raises(ValueError, match="spread.*eig_method='power'"):
        EigenTracker(schedule="spread", method="lanczos")
    with pytest.raises(ValueError, match="eig_schedule must be one of"):
        EigenTracker(schedule="sometimes")
