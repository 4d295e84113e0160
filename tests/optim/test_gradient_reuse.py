"""Eigen-SAM/X-SAM reuse the refresh's gradient as the first pass: bit for bit the same steps."""

import pytest
import torch
from conftest import make_closure
from torch import nn

from eigensam import XSAM, EigenSAM
from eigensam.hessian.closures import split_closure


def cnn(dtype=torch.float32, batchnorm=True, dropout=0.2):
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 4, 3)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Flatten(), nn.Linear(144, 5)]
    return nn.Sequential(*layers).to(dtype)


def batches(dtype=torch.float32, count=5):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 2, 8, 8, generator=g).to(dtype), torch.randint(0, 5, (16,), generator=g))
        for _ in range(count)
    ]


def train(cls, reuse, hvp="autograd", model=None, steps=5, **kwargs):
    # The reuse needs products in the mode the model is in (train) during training.
    kwargs.setdefault("hessian_mode", "train")
    model = cnn() if model is None else model
    opt = cls(
        model,
        torch.optim.SGD,
        rho=0.1,
        eig_interval=2,
        eig_iters=3,
        hvp=hvp,
        reuse_gradient=reuse,
        lr=0.1,
        momentum=0.9,
        **kwargs,
    )
    calls = 0
    losses = []
    torch.manual_seed(5)
    for x, y in batches(count=steps):
        closure = make_closure(model, x, y)

        def counted(closure=closure):
            nonlocal calls
            calls += 1
            return closure()

        losses.append(opt.step(counted))
    return model, opt, calls, losses, torch.get_rng_state()


@pytest.mark.parametrize("cls", [EigenSAM, XSAM])
@pytest.mark.parametrize("hvp", ["autograd", "fd-forward"])
def test_reused_first_pass_is_bit_for_bit_the_fresh_one(cls, hvp):
    # BatchNorm (statistics updated once per step) and dropout (same masks) included.
    fresh_model, fresh, fresh_calls, fresh_losses, fresh_rng = train(cls, False, hvp)
    reused_model, reused, reused_calls, reused_losses, reused_rng = train(cls, True, hvp)
    for a, b in zip(
        fresh_model.state_dict().values(), reused_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert torch.equal(fresh.tracker.vector, reused.tracker.vector)
    assert [loss.item() for loss in fresh_losses] == [loss.item() for loss in reused_losses]
    assert torch.equal(fresh_rng, reused_rng)
    refreshes = 3  # steps 0, 2, 4
    assert fresh_calls - reused_calls == refreshes
    assert reused.tracker.evaluation is None and reused._reusable is None


def test_no_reuse_when_the_model_is_not_in_the_hessian_mode():
    # hessian_mode="eval" differs from the train-mode step: the closure runs for the first pass.
    _, _, fresh_calls, _, _ = train(EigenSAM, False, hessian_mode="eval")
    _, _, reused_calls, _, _ = train(EigenSAM, True, hessian_mode="eval")
    assert reused_calls == fresh_calls


def test_reuse_gradient_must_be_bool():
    with pytest.raises(TypeError, match="reuse_gradient must be a bool, got 1"):
        EigenSAM(cnn(), torch.optim.SGD, reuse_gradient=1, lr=0.1)


@pytest.mark.parametrize("cls", [EigenSAM, XSAM])
def test_memory_lean_products_leave_the_trajectory_unchanged_float64(cls):
    # Same optimizer on a plain closure (whole-batch graph, gradient reused) and on a
    # SplitClosure of 4 parts (products part by part, first pass computed afresh): float64
    # trajectories agree to 1e-10 after 5 steps with 3 refreshes.
    runs = []
    for parts in (None, 4):
        model = cnn(torch.float64, batchnorm=False, dropout=0.0)
        opt = cls(model, torch.optim.SGD, rho=0.1, eig_interval=2, eig_iters=3, lr=0.1)
        for x, y in batches(torch.float64):
            if parts is None:
                opt.step(make_closure(model, x, y))
            else:
                opt.step(split_closure(model, nn.functional.cross_entropy, x, y, parts))
        runs.append((model, opt))
    (a, opt_a), (b, opt_b) = runs
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-10)
    torch.testing.assert_close(opt_b.tracker.vector, opt_a.tracker.vector, rtol=0, atol=1e-10)
