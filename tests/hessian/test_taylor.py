"""Taylor terms ∇f, ∇²f·u, ∇³f(u, u) against closed forms and finite differences."""

import pytest
import torch
from test_hvp import closure_for
from torch import nn

from eigensam.hessian import HessianOperator, HigherOrderUnsupportedError, taylor_terms


def quartic_closure(w, a, b):
    """f(w) = Σ_i a_i w_i⁴ + (Σ_i b_i w_i)³: ∇f = 4a w³ + 3s² b, ∇²f = diag(12 a w²) + 6s b bᵀ,
    ∇³f(u, u) = 24 a w u² + 6 (bᵀu)² b, with s = bᵀw."""

    def closure():
        loss = (a * w**4).sum() + (b @ w) ** 3
        loss.backward()
        return loss

    return closure


def test_quartic_closed_form():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g).double()
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(6, generator=g, dtype=torch.float64)
    terms = taylor_terms(quartic_closure(w, a, b), [w], u)
    x, s = w.detach(), float(b @ w.detach())
    torch.testing.assert_close(terms.gradient, 4 * a * x**3 + 3 * s**2 * b)
    hess = torch.diag(12 * a * x**2) + 6 * s * torch.outer(b, b)
    torch.testing.assert_close(terms.hvp, hess @ u)
    torch.testing.assert_close(terms.third, 24 * a * x * u**2 + 6 * float(b @ u) ** 2 * b)
    assert torch.equal(terms.direction, u)


def test_direction_from_gradient_and_order_two():
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    a, b = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    terms = taylor_terms(quartic_closure(w, a, b), [w], lambda grad: grad / grad.norm(), order=2)
    grad = 4 * w.detach() ** 3
    torch.testing.assert_close(terms.direction, grad / grad.norm())
    torch.testing.assert_close(terms.hvp, 12 * w.detach() ** 2 * terms.direction)
    assert terms.third is None


def test_quadratic_has_zero_third_term():
    w = torch.tensor([1.0, 2.0], requires_grad=True)

    def closure():
        loss = (w**2).sum() + w[0] * w[1]
        loss.backward()
        return loss

    terms = taylor_terms(closure, [w], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(terms.hvp, torch.tensor([2.0, 1.0]))
    assert torch.equal(terms.third, torch.zeros(2))


def gelu_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Dropout(0.3), nn.Linear(8, 3)).double()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (16,), generator=g
    )


def test_third_term_matches_finite_differences_of_hvps_float64():
    """∇³f(u, u) = d/dt [∇²f(w + t u) u] at t = 0, by central differences of exact HVPs."""
    model, (x, y) = gelu_mlp(), batch()
    params = list(model.parameters())
    dim = sum(p.numel() for p in params)
    u = torch.randn(dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.manual_seed(5)
    terms = taylor_terms(closure_for(model, x, y), params, u, model=model)
    h = 1e-4
    sizes = [p.numel() for p in params]
    u_chunks = [c.view_as(p) for c, p in zip(u.split(sizes), params, strict=True)]

    def shifted_hvp(t):
        with torch.no_grad():
            torch._foreach_add_(params, u_chunks, alpha=t)
        torch.manual_seed(5)
        try:
            with HessianOperator(
                closure_for(model, x, y), params, backend="autograd", model=model
            ) as op:
                return op.matvec(u)
        finally:
            with torch.no_grad():
                torch._foreach_add_(params, u_chunks, alpha=-t)

    fd = (shifted_hvp(h) - shifted_hvp(-h)) / (2 * h)
    assert float((terms.third - fd).norm() / fd.norm()) < 1e-6
    torch.manual_seed(5)
    with HessianOperator(closure_for(model, x, y), params, backend="autograd", model=model) as op:
        torch.testing.assert_close(terms.hvp, op.matvec(u), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(terms.gradient, op.gradient(), rtol=1e-12, atol=1e-12)


def test_state_restored():
    """RNG, .grad, module modes and buffers are as on entry; dropout masks are those of entry."""
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Dropout(0.5), nn.Linear(8, 3)
    ).double()
    x, y = batch()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    model.eval()
    model[3].train()
    buffers = [b.clone() for b in model.buffers()]
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    dim = sum(p.numel() for p in params)
    u = torch.ones(dim, dtype=torch.float64)
    first = taylor_terms(closure_for(model, x, y), params, u, model=model, mode="train")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in params)
    assert [m.training for m in model.modules()] == [False, False, False, False, True, False]
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    second = taylor_terms(closure_for(model, x, y), params, u, model=model, mode="train")
    assert torch.equal(first.third, second.third)


def test_kernel_without_double_backward_is_named(no_double_backward):
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)

    def closure():
        loss = no_double_backward(lin(x)).pow(2).sum()
        loss.backward()
        return loss

    with pytest.raises(HigherOrderUnsupportedError, match="model: .*double backward"):
        taylor_terms(closure, lin.parameters(), torch.ones(8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"u": torch.ones(3)}, "u must be a flat tensor of shape \\(2,\\)"),
        ({"u": "up"}, "u must be a flat tensor or a function"),
        ({"u": torch.ones(2), "order": 4}, "order must be 2 or 3"),
        ({"u": torch.ones(2), "mode": "eval"}, "mode='eval' needs model="),
        ({"u": torch.tensor([1.0, float("nan")])}, "u must be finite"),
    ],
)
def test_bad_input(kwargs, match):
    w = torch.ones(2, requires_grad=True)

    def closure():
        loss = (w**3).sum()
        loss.backward()
        return loss

    with pytest.raises((ValueError, TypeError), match=match):
        taylor_terms(closure, [w], **kwargs)
