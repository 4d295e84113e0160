"""SAM's cheap perturbation path (ρ·g/‖g‖ straight from the gradients) against the safe one."""

import torch
from torch import nn

from eigensam import SAM
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
