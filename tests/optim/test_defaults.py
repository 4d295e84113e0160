"""Eigen-SAM/X-SAM defaults: eval-mode products, hvp="auto", and step(closure, batch=...)
splitting the exact products into hessian_parts micro-batches."""

import warnings

import pytest
import torch
from conftest import SmallNet, loss_closure
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from eigensam import EGR, XSAM, EigenSAM
from eigensam.hessian.closures import SplitClosure
from eigensam.hessian.eigen import power_iteration
from eigensam.hessian.hvp import FD_FALLBACK, FD_SCALE, HessianOperator


def data(n=32, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


class Attention(nn.Module):
    """A smooth transformer block calling F.scaled_dot_product_attention (no double backward
    on CPU) and a classifier head."""

    def __init__(self):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, activation="gelu", batch_first=True
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.block(x).mean(1))


def sdpa_data(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 5, 16, generator=g), torch.randint(0, 3, (8,), generator=g)


# --------------------------------------------------------------------------------------------
# Eval-mode products by default


@pytest.mark.parametrize("cls", [EigenSAM, XSAM])
def test_default_products_run_in_eval_mode_and_leave_the_model_as_it_was(cls):
    torch.manual_seed(0)
    model = SmallNet(batchnorm=True, dropout=0.3).double()
    x, y = data()
    seen = []
    model.net[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    opt = cls(model, torch.optim.SGD, rho=0.05, eig_interval=1, eig_iters=3, lr=0.1)
    assert opt.tracker.mode == "eval" and opt.tracker.requested_backend == "auto"
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    grads = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    opt.update_eigenvector(lambda: loss_closure(model)(x, y))
    assert seen and not any(seen)  # every product saw BatchNorm in eval mode
    assert model.training and all(m.training for m in model.modules())
    for k, v in buffers.items():
        assert torch.equal(model.state_dict()[k], v)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))


# --------------------------------------------------------------------------------------------
# hvp="auto"


def test_auto_picks_the_exact_backend_for_an_mlp_without_a_warning():
    model = SmallNet().double()
    x, y = data()
    opt = EigenSAM(model, torch.optim.SGD, rho=0.05, eig_interval=2, eig_iters=3, lr=0.1)
    assert opt.tracker.backend == "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(loss_closure(model), batch=(x, y))
    assert opt.tracker.backend == "autograd"
    assert opt.state_dict()["tracker"]["backend"] == "autograd"


def test_auto_falls_back_to_finite_differences_on_sdpa_once_and_resumes_without_switching():
    torch.manual_seed(0)
    model = Attention()
    x, y = sdpa_data()
    opt = EigenSAM(model, torch.optim.SGD, rho=0.05, eig_interval=1, eig_iters=3, lr=0.01)
    with pytest.warns(RuntimeWarning, match=r"no double backward .*'fd-central'") as caught:
        opt.step(loss_closure(model), batch=(x, y))
        opt.step(loss_closure(model), batch=(x, y))
    assert len([w for w in caught if "double backward" in str(w.message)]) == 1  # once
    assert opt.tracker.backend == FD_FALLBACK
    resumed = EigenSAM(model, torch.optim.SGD, rho=0.05, eig_interval=1, eig_iters=3, lr=0.01)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.tracker.backend == FD_FALLBACK  # before any refresh
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt at the exact product
        resumed.step(loss_closure(model), batch=(x, y))


def test_fallback_products_on_sdpa_match_the_math_backend_exact_product():
    # The tolerance stated in eigensam.hessian.hvp's docstring: about 1e-3 relative (float32).
    torch.manual_seed(0)
    model = Attention()
    x, y = sdpa_data()

    def closure():
        return loss_closure(model)(x, y)

    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(3))
    with (
        sdpa_kernel(SDPBackend.MATH),
        HessianOperator(closure, params, backend="autograd", model=model, mode="eval") as exact,
    ):
        exact_v = exact.matvec(v)
        top = power_iteration(exact.matvec, v, 30)
    with HessianOperator(closure, params, backend=FD_FALLBACK, model=model, mode="eval") as fd:
        assert fd.fd_scale == FD_SCALE[FD_FALLBACK] == 1e-4
        fd_v = fd.matvec(v)
        fd_top = power_iteration(fd.matvec, v, 30)
    assert float((fd_v - exact_v).norm() / exact_v.norm()) < 5e-3
    assert fd_top.eigenvalue == pytest.approx(top.eigenvalue, rel=5e-3)


def test_explicit_exact_backend_on_sdpa_still_raises_naming_the_fix():
    model = Attention()
    x, y = sdpa_data()
    opt = EigenSAM(model, torch.optim.SGD, rho=0.05, hvp="autograd", lr=0.01)
    with pytest.raises(RuntimeError, match="hvp='fd-central'"):
        opt.step(loss_closure(model), batch=(x, y))


def test_egr_auto_falls_back_on_sdpa_and_keeps_the_choice():
    model = Attention()
    x, y = sdpa_data()
    opt = EGR(model, torch.optim.SGD, rho=0.05, lr=0.01)
    with pytest.warns(RuntimeWarning, match="no double backward"):
        opt.step(loss_closure(model), batch=(x, y))
    assert opt.hvp == FD_FALLBACK


# --------------------------------------------------------------------------------------------
# step(closure, batch=...) and hessian_parts


def tracked(cls, model, **kwargs):
    return cls(model, torch.optim.SGD, rho=0.05, eig_interval=2, eig_iters=4, lr=0.1, **kwargs)


@pytest.mark.parametrize("cls", [EigenSAM, XSAM])
def test_split_products_equal_whole_batch_ones_and_the_trajectory(cls):
    torch.manual_seed(0)
    whole_model = SmallNet(batchnorm=True, dropout=0.2).double()
    lean_model = SmallNet(batchnorm=True, dropout=0.2).double()
    lean_model.load_state_dict(whole_model.state_dict())
    whole = tracked(cls, whole_model, hessian_parts=1)
    lean = tracked(cls, lean_model, hessian_parts=4)
    assert lean._parts == 4
    parts_seen = []
    original = HessianOperator.__enter__

    def spy(self):
        parts_seen.append(len(self.parts or ()))
        return original(self)

    for step in range(5):
        x, y = data(seed=10 + step)
        torch.manual_seed(step)
        whole.step(loss_closure(whole_model), batch=(x, y))
        torch.manual_seed(step)
        HessianOperator.__enter__ = spy
        try:
            lean.step(loss_closure(lean_model), batch=(x, y))
        finally:
            HessianOperator.__enter__ = original
        assert lean.tracker.eigenvalue == pytest.approx(whole.tracker.eigenvalue, rel=1e-10)
        torch.testing.assert_close(lean.tracker.vector, whole.tracker.vector, rtol=0, atol=1e-10)
    assert parts_seen == [4, 4, 4]  # refreshes at steps 0, 2, 4
    for a, b in zip(
        whole_model.state_dict().values(), lean_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_auto_parts_follow_the_model_and_are_capped_at_the_batch():
    assert tracked(EigenSAM, SmallNet())._parts == 4
    assert tracked(EigenSAM, SmallNet(batchnorm=True))._parts == 4  # eval-mode products
    assert tracked(EigenSAM, SmallNet(batchnorm=True), hessian_mode="train")._parts == 1
    net = SmallNet()
    assert tracked(EigenSAM, list(net.parameters()))._parts == 1  # no model: cannot check
    model = SmallNet().double()
    opt = tracked(EigenSAM, model)
    x, y = data(n=3)
    opt.step(loss_closure(model), batch=(x, y))  # 3 samples: 3 parts, no error
    assert opt.tracker.vector is not None


def test_dict_batches_are_passed_as_keyword_arguments_and_split():
    model = SmallNet().double()
    x, y = data()
    opt = tracked(EigenSAM, model, hessian_parts=4)
    calls = []

    def closure(inputs, labels, note="kept"):
        calls.append((len(inputs), note))
        return loss_closure(model)(inputs, labels)

    opt.step(closure, batch={"inputs": x, "labels": y, "note": "kept"})
    assert (8, "kept") in calls and (32, "kept") in calls


def test_split_refuses_batchnorm_in_train_mode_naming_the_fix():
    with pytest.raises(ValueError, match=r"hessian_parts=4 .*BatchNorm .*hessian_mode='eval'"):
        tracked(EigenSAM, SmallNet(batchnorm=True), hessian_mode="train", hessian_parts=4)


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-2, ValueError), (2.5, TypeError), ("four", TypeError), (True, TypeError)],
)
def test_bad_hessian_parts_name_the_argument(value, error):
    with pytest.raises(error, match=r"hessian_parts must be a positive int or 'auto'"):
        tracked(EigenSAM, SmallNet(), hessian_parts=value)


def test_more_parts_than_samples_take_one_per_sample_and_parts_need_a_batch():
    model = SmallNet().double()
    opt = tracked(EigenSAM, model, hessian_parts=8)
    x, y = data(n=5)
    assert (opt.split_count(5), opt.split_count(32)) == (5, 8)
    split = opt.bind(loss_closure(model), batch=(x, y))  # step 0: a refresh
    assert isinstance(split, SplitClosure) and len(split.parts) == 5
    opt.step(loss_closure(model), batch=(x, y))
    assert opt.tracker.num_updates == 1
    with pytest.raises(ValueError, match=r"hessian_parts=8 splits the batch, so step\(\) needs"):
        opt.step(lambda: loss_closure(model)(x, y))


@pytest.mark.parametrize("hvp", ["fd-central", "fd-forward"])
def test_finite_difference_products_use_the_whole_batch(hvp):
    model = SmallNet().double()
    opt = tracked(EigenSAM, model, hessian_parts=4, hvp=hvp)
    x, y = data(n=8)
    assert opt.split_count(8) == 1
    assert not isinstance(opt.bind(loss_closure(model), batch=(x, y)), SplitClosure)


def test_unknown_hvp_and_bad_batch_are_refused():
    with pytest.raises(ValueError, match=r"hvp must be one of \('auto', 'autograd'"):
        tracked(EigenSAM, SmallNet(), hvp="exact")
    model = SmallNet().double()
    opt = tracked(EigenSAM, model)
    with pytest.raises(TypeError, match="batch must be a tuple/list"):
        opt.step(loss_closure(model), batch=torch.zeros(3))
