"""Hessian-vector products against the full Hessian of small networks."""

import pytest
import torch
from hessian_truth import full_hessian
from torch import nn

from eigensam.hessian.eigen import power_iteration
from eigensam.hessian.hvp import HessianOperator
from eigensam.hessian.tracker import EigenTracker


def mlp(dtype, batchnorm=False, dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 7)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(7))
    layers += [nn.GELU(), nn.Dropout(dropout), nn.Linear(7, 3)]
    return nn.Sequential(*layers).to(dtype)


def data(dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(24, 5, generator=g).to(dtype), torch.randint(0, 3, (24,), generator=g)


def closure_for(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize(
    "backend, dtype, rtol",
    [
        ("autograd", torch.float64, 1e-12),
        ("fd-central", torch.float64, 1e-6),
        ("fd-forward", torch.float64, 1e-3),
        ("autograd", torch.float32, 1e-5),
        ("fd-central", torch.float32, 2e-2),
        ("fd-forward", torch.float32, 5e-2),
    ],
)
def test_every_backend_agrees_with_full_hessian(backend, dtype, rtol):
    model = mlp(dtype)
    x, y = data(dtype)
    h = full_hessian(model, x, y)
    v = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(2), dtype=dtype)
    with HessianOperator(
        closure_for(model, x, y), model.parameters(), backend=backend, model=model
    ) as op:
        hv = op.matvec(v)
    error = float((hv - h @ v).norm() / (h @ v).norm())
    assert error < rtol
    assert float(torch.nn.functional.cosine_similarity(hv, h @ v, dim=0)) > 0.99


@pytest.mark.parametrize("backend", ["autograd", "fd-central", "fd-forward"])
def test_operator_is_fixed_and_side_effect_free(backend):
    """Same dropout masks for every product, BN buffers, RNG, mode and .grad untouched."""
    model = mlp(torch.float64, batchnorm=True, dropout=0.5)
    x, y = data(torch.float64)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    grads = [p.grad for p in params]
    buffers = [b.clone() for b in model.buffers()]
    model.eval()
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    rng = torch.get_rng_state()
    with HessianOperator(
        closure_for(model, x, y), params, backend=backend, model=model, mode="train"
    ) as op:
        assert model.training
        first, second = op.matvec(v), op.matvec(v)
    assert torch.equal(first, second)
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), buffers, strict=True))
    assert all(p.grad is g for p, g in zip(params, grads, strict=True))


def test_hvp_is_symmetric_operator():
    model = mlp(torch.float64)
    x, y = data(torch.float64)
    g = torch.Generator().manual_seed(5)
    with HessianOperator(closure_for(model, x, y), model.parameters(), backend="autograd") as op:
        u, v = (
            torch.randn(op.dim, generator=g, dtype=torch.float64),
            torch.randn(op.dim, generator=g, dtype=torch.float64),
        )
        assert float(u @ op.matvec(v)) == pytest.approx(float(v @ op.matvec(u)), rel=1e-10)


def test_power_iteration_and_tracker_align_with_true_top_eigenvector():
    model = mlp(torch.float64)
    x, y = data(torch.float64)
    h = full_hessian(model, x, y)
    eigenvalues, eigenvectors = torch.linalg.eigh(h)
    top = int(eigenvalues.abs().argmax())
    with HessianOperator(closure_for(model, x, y), model.parameters(), backend="autograd") as op:
        result = power_iteration(op.matvec, torch.ones(op.dim, dtype=torch.float64), 500, tol=1e-9)
    assert result.converged and result.residual <= 1e-9 * abs(result.eigenvalue)
    assert result.eigenvalue == pytest.approx(float(eigenvalues[top]), rel=1e-8)
    assert abs(float(result.eigenvector @ eigenvectors[:, top])) > 1 - 1e-8

    tracker = EigenTracker(interval=1, iters=20, backend="fd-central")
    for _ in range(10):  # warm-started refreshes keep improving the estimate
        tracker.update(closure_for(model, x, y), list(model.parameters()), model)
    assert abs(float(tracker.vector @ eigenvectors[:, top])) > 0.999


def test_bad_operator_arguments():
    model = mlp(torch.float32)
    x, y = data(torch.float32)
    closure = closure_for(model, x, y)
    with pytest.raises(ValueError, match="backend"):
        HessianOperator(closure, model.parameters(), backend="jax")
    with pytest.raises(ValueError, match="mode"):
        HessianOperator(closure, model.parameters(), mode="test", model=model)
    with pytest.raises(ValueError, match="fd_scale"):
        HessianOperator(closure, model.parameters(), fd_scale=-1.0)
    with (
        HessianOperator(closure, model.parameters(), model=model) as op,
        pytest.raises(ValueError, match="shape"),
    ):
        op.matvec(torch.ones(3))
    with pytest.raises(RuntimeError, match="inside"):
        HessianOperator(closure, model.parameters(), model=model).matvec(torch.ones(66))
