"""What a new user meets first: manual loops with NaN, a skipped eigenvector refresh, the wrong
state dict, the constructors' signatures and the loss ``step()`` returns."""

import inspect
import warnings

import pytest
import torch
from conftest import SmallNet, make_closure
from torch import nn

from eigensam import EGR, SAM, XSAM, EigenSAM, ReverseSAM
from eigensam.optim.tracked import TrackedSAM

SAM_FAMILY = [SAM, ReverseSAM, EigenSAM, XSAM]


def build(cls, model, **kwargs):
    if issubclass(cls, TrackedSAM):
        kwargs = dict(eig_interval=2, eig_iters=2, **kwargs)
    return cls(model, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **kwargs)


def manual_step(opt, model, x, y, x_second=None):
    """The README's manual loop (Eigen-SAM / X-SAM: refresh when due)."""
    if isinstance(opt, TrackedSAM) and opt.tracker.due(opt.sam_steps):
        opt.update_eigenvector(make_closure(model, x, y))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x if x_second is None else x_second), y).backward()
    opt.second_step(zero_grad=True)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, before):
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize("cls", SAM_FAMILY)
@pytest.mark.parametrize("nan_pass", ["first", "second"])
def test_manual_loop_nan_raises_or_skips_with_weights_unchanged(cls, nan_pass, batch):
    x, y = batch
    nan_x = x.clone()
    nan_x[0, 0] = float("nan")
    torch.manual_seed(0)
    model = SmallNet()
    opt = build(cls, model)
    manual_step(opt, model, x, y)  # a clean step first: momentum exists, v̂ too
    before = weights(model)
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    first, second = (nan_x, x) if nan_pass == "first" else (x, nan_x)

    opt.sam_steps = 1  # not a refresh step: only the NaN is tested here
    with pytest.raises(FloatingPointError, match=f"non-finite loss or gradient in the {nan_pass}"):
        manual_step(opt, model, first, y, x_second=second)
    assert_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())

    opt.on_nonfinite = "skip"
    with pytest.warns(RuntimeWarning, match="step skipped, weights unchanged"):
        manual_step(opt, model, first, y, x_second=second)
    assert_unchanged(model, before)
    assert opt.sam_steps == 1, "a skipped step is not counted"
    for p, m in zip(model.parameters(), momentum, strict=True):
        assert torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], m)

    # The loop goes on: the next clean step is the step an untouched optimizer takes.
    manual_step(opt, model, x, y)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("cls", [SAM, EigenSAM])
def test_skipped_manual_step_is_a_no_op_for_the_trajectory(cls, batch):
    """Skipping a NaN batch in a manual loop leaves the optimizer where it was: the following
    steps are bit for bit those of a loop that never saw the NaN batch."""
    x, y = batch
    nan_x = torch.full_like(x, float("nan"))

    def run(with_nan):
        torch.manual_seed(0)
        model = SmallNet()
        opt = build(cls, model, on_nonfinite="skip")
        for step in range(3):
            if with_nan and step == 1:
                with pytest.warns(RuntimeWarning, match="skipped"):
                    manual_step(opt, model, nan_x, y)
            manual_step(opt, model, x + step, y)
        return weights(model)

    for p, q in zip(run(True), run(False), strict=True):
        assert torch.equal(p, q)


def test_manual_loop_overflow_with_a_grad_scaler_skips_and_backs_off(batch):
    x, y = batch
    torch.manual_seed(0)
    model = SmallNet()
    opt = build(SAM, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = weights(model)
    inf_x = x.clone()
    inf_x[0, 0] = float("inf")
    scaler.scale(nn.functional.cross_entropy(model(inf_x), y)).backward()
    assert opt.first_step(zero_grad=True, scaler=scaler) is False
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    assert opt.second_step(zero_grad=True, scaler=scaler) is False
    scaler.update()
    assert scaler.get_scale() == 512.0
    assert_unchanged(model, before)


@pytest.mark.parametrize("cls", [EigenSAM, XSAM])
def test_manual_loop_without_refresh_warns_once_naming_update_eigenvector(cls, batch):
    x, y = batch
    model = SmallNet()
    opt = build(cls, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
    missed = [w for w in caught if "update_eigenvector" in str(w.message)]
    assert len(missed) == 1 and issubclass(missed[0].category, RuntimeWarning)
    assert "step 0" in str(missed[0].message)
    assert opt.tracker.vector is None


@pytest.mark.parametrize("cls", [EigenSAM, XSAM])
def test_loops_that_refresh_do_not_warn(cls, batch):
    x, y = batch
    model = SmallNet()
    manual, automatic = build(cls, model), build(cls, SmallNet())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*update_eigenvector")
        for _ in range(5):
            manual_step(manual, model, x, y)
            automatic.step(make_closure(automatic.model, x, y))
    assert manual.tracker.num_updates == automatic.tracker.num_updates == 3


def test_loading_another_optimizers_state_names_both():
    model = SmallNet()
    sam = SAM(model, torch.optim.SGD, lr=0.1)
    eigen = EigenSAM(model, torch.optim.SGD, lr=0.1)
    both = r"cannot load the state of SAM\(SGD\) into EigenSAM\(SGD\)"
    with pytest.raises(ValueError, match=both):
        eigen.load_state_dict(sam.state_dict())
    with pytest.raises(ValueError, match=r"state of EigenSAM\(SGD\) into XSAM\(SGD\)"):
        XSAM(model, torch.optim.SGD, lr=0.1).load_state_dict(eigen.state_dict())
    with pytest.raises(ValueError, match=r"state of SAM\(SGD\) into SAM\(Adam\)"):
        SAM(model, torch.optim.Adam, lr=0.1).load_state_dict(sam.state_dict())
    plain = torch.optim.SGD(model.parameters(), lr=0.3).state_dict()
    with pytest.raises(
        ValueError,
        match=r"cannot load a plain torch.optim optimizer's state .* into SAM\(SGD\); .*"
        r"opt.base_optimizer.load_state_dict",
    ):
        sam.load_state_dict(plain)
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        sam.load_state_dict([])
    assert sam.param_groups[0]["lr"] == 0.1, "a refused state changes nothing"


def test_state_saved_without_the_optimizers_name_still_loads():
    model = SmallNet()
    saved = EigenSAM(model, torch.optim.SGD, lr=0.1).state_dict()
    saved["sam_steps"] = 7
    del saved["optimizer"]
    opt = EigenSAM(model, torch.optim.SGD, lr=0.1)
    opt.load_state_dict(saved)
    assert opt.sam_steps == 7
    del saved["tracker"]
    with pytest.raises(ValueError, match=r"a state without \['tracker'\] .* into EigenSAM"):
        opt.load_state_dict(saved)


TRACKED = (
    "alpha eig_interval eig_iters eig_method eig_schedule hvp hessian_mode hessian_parts seed "
    "reuse_gradient"
).split()
SAM_OPTIONS = ["rho", "adaptive", "eta", "model", "on_nonfinite", "sharpness"]


@pytest.mark.parametrize(
    "cls, names",
    [
        (SAM, SAM_OPTIONS),
        (ReverseSAM, SAM_OPTIONS),
        (EGR, ["rho", "model", "on_nonfinite", "hvp", "hessian_parts"]),
        (XSAM, SAM_OPTIONS + TRACKED),
        (EigenSAM, [*SAM_OPTIONS, *TRACKED, "target_align", "alpha_max"]),
    ],
)
def test_constructors_show_their_options(cls, names):
    parameters = inspect.signature(cls).parameters
    assert list(parameters)[:2] == ["params", "base_optimizer"]
    assert set(names) <= set(parameters)
    kinds = [p.kind for p in parameters.values()]
    assert inspect.Parameter.VAR_POSITIONAL not in kinds
    assert kinds[-1] == inspect.Parameter.VAR_KEYWORD  # the base optimizer's keyword arguments


@pytest.mark.parametrize("cls", [EigenSAM, XSAM])
def test_signatures_forward_every_option_with_the_cores_default(cls):
    """The public classes restate TrackedSAM's and SAM's options: same defaults, and each
    reaches the optimizer."""
    own = inspect.signature(cls).parameters
    for core in (TrackedSAM, SAM):
        for name, p in inspect.signature(core).parameters.items():
            if name not in ("alpha", "base_kwargs"):
                assert own[name].default == p.default, name
    model = SmallNet()
    opt = cls(
        model,
        torch.optim.SGD,
        0.1,
        0.5,
        eig_interval=7,
        eig_iters=3,
        eig_method="lanczos",
        hvp="fd-central",
        hessian_mode="train",
        hessian_parts=1,
        seed=5,
        reuse_gradient=False,
        on_nonfinite="skip",
        lr=0.2,
    )
    t = opt.tracker
    assert (t.interval, t.iters, t.rule.name, t.requested_backend, t.mode) == (
        7,
        3,
        "lanczos",
        "fd-central",
        "train",
    )
    assert torch.equal(t.generator.get_state(), torch.Generator().manual_seed(5).get_state())
    group = opt.param_groups[0]
    assert (group["rho"], group["alpha"], group["lr"]) == (0.1, 0.5, 0.2)
    assert (opt.hessian_parts, opt.reuse_gradient, opt.on_nonfinite) == (1, False, "skip")
    assert opt.model is model


@pytest.mark.parametrize("cls", [*SAM_FAMILY, EGR])
@pytest.mark.parametrize("refresh", [False, True])
def test_step_returns_a_detached_loss(cls, refresh, batch):
    x, y = batch
    model = SmallNet().eval()  # eval mode: Eigen-SAM's refresh step reuses its gradient
    opt = cls(model, torch.optim.SGD, lr=0.1)
    if not refresh:
        opt.sam_steps = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = opt.step(make_closure(model, x, y))
        assert loss.grad_fn is None and not loss.requires_grad
        float(loss)


def test_egr_has_no_manual_loop():
    opt = EGR(SmallNet(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="EGR has no manual loop.*opt.step"):
        opt.first_step()
    with pytest.raises(TypeError, match="EGR has no manual loop"):
        opt.second_step()
