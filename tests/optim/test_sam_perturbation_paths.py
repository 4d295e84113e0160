"""SAM's cheap perturbation path (ρ·g/‖g‖ straight from the gradients) against the safe one."""

import pytest
import torch
from torch import nn

from eigensam import SAM, EigenSAM
from eigensam.optim.sam import plain_norm_is_accurate, unit


def two_groups():
    torch.manual_seed(0)
    a, b, frozen = (nn.Parameter(torch.randn(n, dtype=torch.float64)) for n in (5, 7, 3))
    opt = SAM(
        [{"params": [a, frozen]}, {"params": [b], "rho": 0.3}], torch.optim.SGD, rho=0.1, lr=0.1
    )
    a.grad, b.grad = torch.randn(5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    return opt, (a, b, frozen)


def test_applied_perturbation_is_rho_times_the_unit_gradient_per_group():
    opt, (a, b, frozen) = two_groups()
    params = (a, frozen, b)  # the optimizer's order: group 0 = [a, frozen], group 1 = [b]
    before = [p.detach().clone() for p in params]
    norm = torch.cat([a.grad, b.grad]).norm()
    expected = [0.1 * a.grad / norm, torch.zeros(3, dtype=torch.float64), 0.3 * b.grad / norm]
    eps = opt.perturbation(torch.cat([a.grad, torch.zeros(3, dtype=torch.float64), b.grad]))
    opt.first_step()
    for p, w, e, part in zip(params, before, expected, eps.split([5, 3, 7]), strict=True):
        torch.testing.assert_close(p.detach() - w, e, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(part, e, rtol=1e-12, atol=0)  # what perturbation() predicts
    opt.second_step()
    assert torch.equal(frozen.detach(), before[1])  # restored, and no gradient to step with


def test_cheap_path_agrees_with_the_overflow_safe_direction():
    opt, (a, b, _) = two_groups()
    g = torch.cat([a.grad, torch.zeros(3, dtype=torch.float64), b.grad])
    assert plain_norm_is_accurate(float(g.norm()), g.dtype)
    safe = unit(g)
    eps = opt.perturbation(g)
    torch.testing.assert_close(eps[:8] / 0.1, safe[:8], rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(eps[8:] / 0.3, safe[8:], rtol=1e-13, atol=1e-16)


def test_norm_range_of_the_cheap_path():
    assert plain_norm_is_accurate(1.0, torch.float32)
    assert not plain_norm_is_accurate(1e20, torch.float32)
    assert not plain_norm_is_accurate(1e-20, torch.float32)
    assert plain_norm_is_accurate(1e-100, torch.float64)
    assert not plain_norm_is_accurate(1.0, torch.float16)  # squares overflow early: never


def test_weight_buffer_follows_new_parameter_groups():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4))
    opt = SAM([w], torch.optim.SGD, rho=0.1, lr=0.0)

    def step(params):
        def closure():
            loss = sum((p**2).sum() for p in params)
            loss.backward()
            return loss

        before = [p.detach().clone() for p in params]
        opt.step(closure)
        for p, b in zip(params, before, strict=True):
            assert torch.equal(p.detach(), b)  # lr 0: SAM's restore puts w back exactly

    step([w])
    v = nn.Parameter(torch.randn(2, 3))
    opt.add_param_group({"params": [v]})
    step([w, v])


@pytest.mark.parametrize("alpha", [(0.2, 0.7), ("auto", "auto")])
def test_eigen_sam_cheap_path_is_eq_8_and_agrees_with_the_safe_direction(alpha):
    torch.manual_seed(0)
    a, b = (nn.Parameter(torch.randn(n, dtype=torch.float64)) for n in (5, 7))
    groups = [{"params": [a], "alpha": alpha[0]}, {"params": [b], "alpha": alpha[1], "rho": 0.3}]
    opt = EigenSAM(groups, torch.optim.SGD, rho=0.1, lr=0.1)
    v = torch.randn(12, dtype=torch.float64)
    opt.tracker.vector = v / v.norm()
    g = torch.randn(12, dtype=torch.float64)
    eps = opt.perturbation(g)
    # Eq. 8 written out: ε = ρ(ĝ + α·sign(⟨v̂, ĝ⟩)·(v̂ − ⟨v̂, ĝ⟩ĝ)) per group.
    g_hat, v_hat = g / g.norm(), opt.tracker.vector
    along = float(v_hat @ g_hat)
    alphas = [opt.last_alpha] * 2 if alpha[0] == "auto" else list(alpha)
    sign = 1.0 if along >= 0 else -1.0
    for part, rho, al in ((slice(0, 5), 0.1, alphas[0]), (slice(5, 12), 0.3, alphas[1])):
        expected = rho * (g_hat + al * sign * (v_hat - along * g_hat))[part]
        torch.testing.assert_close(eps[part], expected, rtol=1e-12, atol=1e-15)
        safe = torch.cat(opt._ascent_direction(g))[part] * rho
        torch.testing.assert_close(eps[part], safe, rtol=1e-12, atol=1e-15)


def test_eigen_sam_huge_gradient_takes_the_safe_path_with_the_same_direction():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(50))
    opt = EigenSAM([w], torch.optim.SGD, rho=0.1, alpha=0.5, lr=0.1)
    v = torch.randn(50)
    opt.tracker.vector = v / v.norm()
    g = torch.randn(50)
    small, huge = opt.perturbation(g), opt.perturbation(g * 1e25)
    assert not plain_norm_is_accurate(float((g * 1e25).norm()), torch.float32)
    torch.testing.assert_close(huge, small, rtol=1e-5, atol=1e-7)
