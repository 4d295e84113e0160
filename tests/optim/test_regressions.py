"""Regression tests for the bugs the property-based tests (test_properties.py) and mypy found."""

import pytest
import torch
from conftest import SmallNet, make_closure
from torch import nn

from eigensam import EGR, SAM, XSAM, EigenSAM


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-25, 1e20, 1e36])
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_norm_is_rho_for_huge_and_tiny_gradients(dtype, magnitude, adaptive):
    """The plain 2-norm of such gradients is inf (squares overflow) or 0 (they underflow): ε was
    0 (SAM silently became SGD) or NaN (ASAM)."""
    w = nn.Parameter(torch.linspace(0.5, 2.0, 50).to(dtype))
    grad = (torch.linspace(-1.0, 1.0, 50) * magnitude).to(dtype)
    assert float(grad.norm()) in (0.0, float("inf")) or magnitude == 1e20 and dtype == torch.float32
    opt = SAM([w], torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.1)
    eps = opt.perturbation(grad).double()
    if adaptive:
        eps = eps / w.detach().double().abs()
    assert float(eps.norm()) == pytest.approx(0.1, rel=0.02)


def test_finite_huge_gradients_are_not_reported_as_nonfinite():
    """The finiteness check used the 2-norm of all gradients, inf for finite entries ~1e20 in
    float32: the step raised FloatingPointError although nothing was NaN/inf."""
    w = nn.Parameter(torch.ones(10))
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=1e-22)

    def closure():
        loss = (w * 1e20).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.isfinite(w).all() and not torch.equal(w, torch.ones(10))


def frozen_net():
    torch.manual_seed(0)
    model = SmallNet()
    model.net[0].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("cls", [EigenSAM, XSAM])
def test_tracked_optimizers_accept_frozen_parameters(cls, batch):
    """A parameter with requires_grad=False among the optimizer's parameters made every
    eigenvector refresh fail ("v must have shape ..."): v̂ now spans all parameters and is 0 on
    the frozen ones."""
    model = frozen_net()
    frozen = model.net[0].weight.detach().clone()
    opt = cls(
        model.parameters(),
        torch.optim.SGD,
        model=model,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-2,
        eig_interval=1,
    )
    for _ in range(3):
        opt.step(make_closure(model, *batch))
    assert torch.equal(model.net[0].weight, frozen)
    v = opt.tracker.vector
    assert v.numel() == sum(p.numel() for p in model.parameters())
    assert torch.all(v[: frozen.numel()] == 0) and float(v.norm()) == pytest.approx(1.0)


@pytest.mark.parametrize("cls", [EigenSAM, XSAM])
def test_a_module_gives_the_optimizers_its_trainable_parameters_only(cls, batch):
    model = frozen_net()
    opt = cls(model, torch.optim.SGD, lr=0.1, momentum=0.9, eig_interval=1)
    opt.step(make_closure(model, *batch))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [p for g in opt.param_groups for p in g["params"]] == trainable
    assert opt.tracker.vector.numel() == sum(p.numel() for p in trainable)


def test_xsam_leaves_parameters_without_gradient_alone(batch):
    """X-SAM gave every parameter without a gradient (frozen, unused) a zero gradient, so the
    base optimizer's weight decay and momentum moved them."""
    torch.manual_seed(0)
    model = SmallNet()
    unused = nn.Linear(2, 2)
    model.unused = unused
    before = [p.detach().clone() for p in unused.parameters()]
    opt = XSAM(model, torch.optim.SGD, lr=0.1, weight_decay=0.1, eig_interval=1)
    for _ in range(2):
        opt.step(make_closure(model, *batch))
    assert all(p.grad is None for p in unused.parameters())
    assert all(torch.equal(p, b) for p, b in zip(unused.parameters(), before, strict=True))


@pytest.mark.parametrize("cls", [EigenSAM, XSAM])
def test_tracked_optimizers_with_parameters_of_several_dtypes(cls, batch):
    """Parameters of float32 and float64 in one optimizer: the refresh failed with a dtype
    mismatch in a dot product; vectors now take the promoted dtype, as torch.cat does."""
    torch.manual_seed(0)
    model = SmallNet()
    model.net[-1].double()

    class Cast(nn.Module):
        def forward(self, x):
            return x.double()

    model.net.insert(len(model.net) - 1, Cast())
    opt = cls(model, torch.optim.SGD, lr=0.1, eig_interval=1)
    losses = [float(opt.step(make_closure(model, *batch)).detach()) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert opt.tracker.vector.dtype == torch.float64


def test_xsam_alpha_can_be_given_by_position():
    """XSAM(params, base, rho, alpha) raised "got multiple values for argument 'alpha'"."""
    w = nn.Parameter(torch.zeros(3))
    assert XSAM([w], torch.optim.SGD, 0.05, 0.5, lr=0.1).param_groups[0]["alpha"] == 0.5


def test_egr_accepts_frozen_parameters_and_leaves_gradient_less_ones_alone(batch):
    """EGR with a frozen parameter failed ("base_grad must have shape ..."), and it gave every
    parameter without a gradient a zero one, so weight decay moved unused parameters."""
    model = frozen_net()
    model.unused = nn.Linear(2, 2)
    frozen = model.net[0].weight.detach().clone()
    unused = [p.detach().clone() for p in model.unused.parameters()]
    opt = EGR(model, torch.optim.SGD, rho=0.1, lr=0.1, weight_decay=0.1)
    losses = [float(opt.step(make_closure(model, *batch)).detach()) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert torch.equal(model.net[0].weight, frozen)
    assert all(torch.equal(p, b) for p, b in zip(model.unused.parameters(), unused, strict=True))


def test_xsam_correction_near_the_dtype_limit_is_exact_or_a_floating_point_error():
    """⟨g', v̂⟩ of a bfloat16 gradient near 1e38 overflowed the conversion to bfloat16 and raised
    an undocumented RuntimeError; the correction is now computed on g'/max|g'ᵢ|."""
    w = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = XSAM([w], torch.optim.SGD, rho=0.0, alpha=1.0, lr=0.0)
    opt.tracker.vector = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.bfloat16)
    for magnitude, finite in ((1e37, True), (3e38, False)):
        w.grad = torch.full((4,), magnitude, dtype=torch.bfloat16) * torch.tensor(
            [1.0, 1.0, 1.0, -1.0], dtype=torch.bfloat16
        )
        if finite:
            opt._correct_descent_gradient()
            # g' = m·(1, 1, 1, −1), ⟨g', v̂⟩ = m, g̃ = g' − m·v̂ = m·(0.5, 0.5, 0.5, −1.5)
            expected = torch.tensor([0.5, 0.5, 0.5, -1.5]) * magnitude
            torch.testing.assert_close(w.grad.float(), expected, rtol=1e-2, atol=0)
        else:
            with pytest.raises(FloatingPointError, match="overflows torch.bfloat16"):
                opt._correct_descent_gradient()


def test_egr_nonfinite_hessian_vector_product_leaves_weights_unchanged():
    """A non-finite H·ĝ (here: finite differences with weights so large that the step size
    overflows) went into the gradient and made the weights NaN; it is now a FloatingPointError
    with the weights unchanged, like a non-finite gradient."""
    w = nn.Parameter(torch.full((4,), 1e36, dtype=torch.bfloat16))
    opt = EGR([w], torch.optim.SGD, rho=0.0, lr=1e-3, hvp="fd-central")

    def closure():
        loss = (w.float() * 1e-30).square().sum()
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="Hessian-vector product"):
        opt.step(closure)
    assert torch.equal(w, torch.full((4,), 1e36, dtype=torch.bfloat16))
