"""torch.compile: SAM trains a compiled model; Eigen-SAM and X-SAM work with a compiled model
through the finite-difference backends, and the exact backend raises an error naming them.

The default tests compile with ``backend="aot_eager"`` (TorchDynamo + AOTAutograd, the parts
that decide whether double backward works, without generating C++); the slow test uses the
default inductor backend (needs a C compiler)."""

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

from eigensam import SAM, XSAM, EigenSAM
from eigensam.hessian import DoubleBackwardError


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (and never hits the recompile limit, past which torch
    would silently run the model eagerly)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_model(model, backend):
    """``torch.compile(model)``, checking after the first call that a graph was compiled."""
    compiled = torch.compile(model, backend=backend)

    def forward(x):
        out = compiled(x)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
        return out

    return forward


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def closure_of(forward, x, y):
    def closure():
        loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        return loss

    return closure


def train(make_opt, compile_backend, steps):
    """Losses and final weights of ``steps`` steps, with the model compiled or not (None)."""
    model, x, y = problem()
    forward = model if compile_backend is None else compile_model(model, compile_backend)
    opt = make_opt(model)
    closure = closure_of(forward, x, y)
    losses = [float(opt.step(closure).detach()) for _ in range(steps)]
    return losses, [p.detach().clone() for p in model.parameters()], opt


def check_sam_trains_compiled(backend):
    make = lambda m: SAM(m, torch.optim.SGD, rho=0.05, lr=0.2, momentum=0.9)  # noqa: E731
    losses, weights, _ = train(make, backend, 6)
    eager_losses, eager_weights, _ = train(make, None, 6)
    assert losses[-1] < 0.95 * losses[0]
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for w, e in zip(weights, eager_weights, strict=True):
        torch.testing.assert_close(w, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [EigenSAM, XSAM])
@pytest.mark.parametrize("hvp", ["fd-central", "fd-forward"])
def test_tracked_optimizers_train_compiled_model_with_finite_differences(cls, hvp):
    make = lambda m: cls(m, torch.optim.SGD, lr=0.2, hvp=hvp, eig_interval=2)  # noqa: E731
    losses, weights, opt = train(make, "aot_eager", 4)
    eager_losses, eager_weights, eager_opt = train(make, None, 4)
    assert losses[-1] < losses[0]
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    assert opt.tracker.eigenvalue == pytest.approx(eager_opt.tracker.eigenvalue, rel=1e-3)
    for w, e in zip(weights, eager_weights, strict=True):
        torch.testing.assert_close(w, e, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("cls", [EigenSAM, XSAM])
def test_exact_products_on_compiled_model_raise_naming_finite_differences(cls):
    model, x, y = problem()
    compiled = compile_model(model, "aot_eager")
    opt = cls(model, torch.optim.SGD, lr=0.2, momentum=0.9, hvp="autograd", eig_interval=1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DoubleBackwardError, match="hvp='fd-central' or hvp='fd-forward'"):
        opt.step(closure_of(compiled, x, y))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert opt.tracker.vector is None and opt.sam_steps == 0


def test_sam_trains_compiled_model():
    check_sam_trains_compiled("aot_eager")


@pytest.mark.slow
def test_sam_trains_model_compiled_with_inductor():
    check_sam_trains_compiled("inductor")
