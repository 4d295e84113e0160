"""ρ = 0, resume, BatchNorm, schedulers, accumulation, mixed precision and bad input."""

import copy
import io

import pytest
import torch
from conftest import SmallNet, make_closure, quadratic
from torch import nn

from eigensam import EGR, SAM, XSAM, EigenSAM, ReverseSAM

OPTIMIZERS = [SAM, EigenSAM, XSAM]


def sgd_kwargs():
    return dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_rho_zero_reproduces_base_optimizer_exactly(cls, batch):
    x, y = batch
    torch.manual_seed(0)
    model = SmallNet()
    reference = copy.deepcopy(model)
    # X-SAM's descent correction does not depend on ρ: it is the base optimizer at ρ = α = 0.
    extra = dict(alpha=0.0, eig_interval=2) if cls is XSAM else {}
    opt = cls(model, torch.optim.SGD, rho=0.0, **extra, **sgd_kwargs())
    base = torch.optim.SGD(reference.parameters(), **sgd_kwargs())
    for _ in range(6):
        opt.step(make_closure(model, x, y))
        base.zero_grad()
        base.step(make_closure(reference, x, y))
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, r)


def train(model, opt, batches, start=0, stop=None):
    for x, y in batches[start:stop]:
        opt.step(make_closure(model, x, y))


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam])
def test_resume_reproduces_uninterrupted_run_bit_for_bit(cls, base):
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(9)
    ]
    kwargs = sgd_kwargs() if base is torch.optim.SGD else dict(lr=1e-2)
    extra = {} if cls is SAM else dict(eig_interval=2, eig_iters=3)

    def fresh():
        torch.manual_seed(0)
        model = SmallNet(batchnorm=True, dropout=0.2)
        return model, cls(model, base, rho=0.05, **extra, **kwargs)

    model, opt = fresh()
    torch.manual_seed(11)
    train(model, opt, batches)
    expected = [p.detach().clone() for p in model.parameters()]

    model, opt = fresh()
    torch.manual_seed(11)
    train(model, opt, batches, stop=5)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buffer
    )
    del model, opt
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model, opt = fresh()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])
    train(model, opt, batches, start=5)
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p, e)
    state = opt.state_dict()
    assert state["base"]["state"], "base optimizer state (momentum / Adam moments) is saved"
    if cls is not SAM:
        assert state["tracker"]["vector"] is not None


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("bn_momentum", [0.1, None])
def test_batchnorm_buffers_updated_by_first_pass_only(cls, bn_momentum, batch):
    x, y = batch
    torch.manual_seed(0)
    model = SmallNet(batchnorm=True, bn_momentum=bn_momentum)
    reference = copy.deepcopy(model)
    extra = {} if cls is SAM else dict(eig_interval=1, eig_iters=3)
    opt = cls(model, torch.optim.SGD, rho=0.05, **extra, lr=0.1)
    opt.step(make_closure(model, x, y))  # Hessian evaluation + two passes
    reference(x)  # exactly one training-mode forward
    for (name, b), r in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(b, r), name
    assert int(model.net[1].num_batches_tracked) == 1


def test_model_mode_restored_after_eval_mode_hessian(batch):
    x, y = batch
    model = SmallNet(batchnorm=True, dropout=0.3)
    opt = EigenSAM(model, torch.optim.SGD, rho=0.05, eig_iters=2, hessian_mode="eval", lr=0.1)
    model.train()
    model.net[3].eval()  # a mixed-mode model stays mixed
    opt.step(make_closure(model, x, y))
    assert model.training and model.net[0].training and not model.net[3].training


def test_scheduler_and_instance_base_share_param_groups(batch):
    x, y = batch
    model = SmallNet()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = EigenSAM(None, base, rho=0.05, model=model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    for _ in range(2):
        opt.step(make_closure(model, x, y))
        scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups is base.param_groups
    assert opt.param_groups[0]["rho"] == 0.05


def test_per_group_rho(batch):
    x, y = batch
    model = SmallNet()
    groups = [
        {"params": model.net[0].parameters(), "rho": 0.0},
        {"params": model.net[3].parameters()},
    ]
    opt = SAM(groups, torch.optim.SGD, rho=0.1, model=model, lr=0.1)
    loss = make_closure(model, x, y)()
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    after = list(model.parameters())
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not torch.equal(after[2], before[2])
    assert loss.isfinite()


def test_gradient_accumulation_through_closure(batch):
    x, y = batch
    torch.manual_seed(0)
    model = SmallNet().double()
    twin = copy.deepcopy(model)
    x = x.double()

    def full():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def accumulated():
        total = 0
        for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
            loss = nn.functional.cross_entropy(twin(xs), ys) / 4
            loss.backward()
            total = total + loss.detach()
        return total

    SAM(model, torch.optim.SGD, rho=0.05, lr=0.1).step(full)
    SAM(twin, torch.optim.SGD, rho=0.05, lr=0.1).step(accumulated)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_manual_first_second_step_equals_closure_step(batch):
    x, y = batch
    torch.manual_seed(0)
    model = SmallNet()
    twin = copy.deepcopy(model)
    SAM(model, torch.optim.SGD, rho=0.05, lr=0.1).step(make_closure(model, x, y))
    opt = SAM(twin, torch.optim.SGD, rho=0.05, lr=0.1)
    make_closure(twin, x, y)()
    opt.first_step(zero_grad=True)
    make_closure(twin, x, y)()
    opt.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [SAM, EigenSAM, XSAM, ReverseSAM, EGR])
def test_bf16_autocast_step(cls, batch):
    x, y = batch
    model = SmallNet(batchnorm=True)
    opt = cls(model, torch.optim.SGD, rho=0.05, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("overflow_call", [0, 1])
def test_grad_scaler_skips_whole_step_when_either_pass_overflows(cls, overflow_call, batch):
    x, y = batch
    model = SmallNet()
    extra = {} if cls is SAM else dict(eig_interval=1000)
    opt = cls(model, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **extra)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    # a first clean step (the tracker's estimate runs here, at step 0)
    opt.step(make_scaled_closure(model, x, y, scaler, []), scaler=scaler)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    calls = []
    opt.step(make_scaled_closure(model, x, y, scaler, calls, overflow_call), scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 512.0
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    for p, m in zip(model.parameters(), momentum, strict=True):
        assert torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], m)


def make_scaled_closure(model, x, y, scaler, calls, overflow_call=None):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        factor = float("inf") if len(calls) == overflow_call else 1.0
        calls.append(1)
        scaler.scale(loss * factor).backward()
        return loss

    return closure


def test_grad_scaler_clean_step_matches_unscaled_step(batch):
    x, y = batch
    torch.manual_seed(0)
    model = SmallNet().double()
    twin = copy.deepcopy(model)
    x = x.double()
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    SAM(model, torch.optim.SGD, rho=0.05, lr=0.1).step(
        make_scaled_closure(model, x, y, scaler, []), scaler=scaler
    )
    scaler.update()
    SAM(twin, torch.optim.SGD, rho=0.05, lr=0.1).step(make_closure(twin, x, y))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=-0.1), "rho"),
        (dict(rho=float("nan")), "rho"),
        (dict(alpha=-1.0), "alpha"),
        (dict(eig_interval=0), "eig_interval"),
        (dict(eig_iters=0), "eig_iters"),
        (dict(eig_method="qr"), "eig_method"),
        (dict(hvp="magic"), "hvp must be one of"),
        (dict(hessian_mode="test"), "hessian_mode"),
        (dict(on_nonfinite="ignore"), "on_nonfinite"),
        (dict(adaptive=True), "adaptive"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    model = SmallNet()
    with pytest.raises((ValueError, TypeError), match=match):
        EigenSAM(model, torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_base_optimizer_and_xsam_alpha_range():
    model = SmallNet()
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(model, "sgd", lr=0.1)
    with pytest.raises(ValueError, match="alpha"):
        XSAM(model, torch.optim.SGD, alpha=2.5, lr=0.1)
    with pytest.raises(TypeError, match="eig_iters"):
        XSAM(model, torch.optim.SGD, eig_iters=2.5, lr=0.1)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_closure_errors(cls, batch):
    x, y = batch
    model = SmallNet()
    opt = cls(model, torch.optim.SGD, rho=0.05, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="return the loss"):
        opt.step(lambda: None)

    def no_backward():
        return nn.functional.cross_entropy(model(x), y)

    with pytest.raises(ValueError, match="no parameter"):
        opt.step(no_backward)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_non_finite_loss_raises_or_skips_without_touching_weights(cls):
    _, _, w, closure, _ = quadratic([1.0, 2.0])

    def nan_closure():
        loss = closure() * float("nan")
        return loss

    before = w.detach().clone()
    opt = (
        cls([w], torch.optim.SGD, rho=0.05, lr=0.1, eig_interval=1000)
        if cls is not SAM
        else cls([w], torch.optim.SGD, rho=0.05, lr=0.1)
    )
    opt.sam_steps = 1  # past the eigenvector refresh
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(nan_closure)
    assert torch.equal(w.detach(), before)
    opt.on_nonfinite = "skip"
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(nan_closure)
    assert torch.equal(w.detach(), before)


def test_reverse_sam_and_egr_closed_form():
    a, b, w, closure, _ = quadratic([5.0, 2.0, 1.0, -0.5])
    w0 = w.detach().clone()
    ReverseSAM([w], torch.optim.SGD, rho=0.05, lr=0.1).step(closure)
    g = a @ w0 + b
    torch.testing.assert_close(w.detach(), w0 - 0.1 * (a @ (w0 - 0.05 * g / g.norm()) + b))
    a, b, w, closure, _ = quadratic([5.0, 2.0, 1.0, -0.5])
    EGR([w], torch.optim.SGD, rho=0.05, lr=0.1).step(closure)
    # ∇(f + ρ‖∇f‖) = g + ρ A g/‖g‖
    torch.testing.assert_close(
        w.detach(), w0 - 0.1 * (g + 0.05 * a @ g / g.norm()), rtol=0, atol=1e-12
    )
