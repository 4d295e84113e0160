"""GGNOperator against the dense GGN Jᵀ H_ℓ J built from torch.autograd.functional."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from eigensam.hessian import top_eigenvalues
from eigensam.hessian.ggn import GGNOperator, NotLossOfOutputsError
from eigensam.hessian.hvp import BufferSnapshot, flatten

F64 = torch.float64


def dense_ggn(model, batches, criterion):
    """``Σ_i (n_i/N) J_iᵀ H_ℓ,i J_i`` with J by autograd.functional.jacobian and H_ℓ by
    autograd.functional.hessian, in the model's current mode."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    w = flatten(params, params).detach()
    snapshot = BufferSnapshot(model)
    total = sum(x.shape[0] for x, _ in batches)
    g = torch.zeros(w.numel(), w.numel(), dtype=F64)
    for x, y in batches:

        def outputs_of(flat, x=x):
            chunks = flat.split([p.numel() for p in params])
            named = {n: c.view_as(p) for n, c, p in zip(names, chunks, params, strict=True)}
            return functional_call(model, named, (x,))

        out = outputs_of(w).detach()
        jac = torch.autograd.functional.jacobian(outputs_of, w).reshape(out.numel(), -1)
        h_out = torch.autograd.functional.hessian(
            lambda o, y=y, out=out: criterion(o.view_as(out), y), out.reshape(-1)
        )
        g += x.shape[0] / total * jac.T @ h_out @ jac
        snapshot.restore()
    return g


def mlp(activation=nn.Tanh):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), activation(), nn.Linear(6, 3)).to(F64)


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(
        F64
    )


def batches(shape, sizes=(5, 7), classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, *shape, generator=g, dtype=F64),
            torch.randint(0, classes, (n,), generator=g),
        )
        for n in sizes
    ]


def regression(sizes=(6,), seed=2):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 4, generator=g, dtype=F64), torch.randn(n, 3, generator=g, dtype=F64))
        for n in sizes
    ]


CASES = {
    "mlp-cross-entropy-two-batches": (mlp, lambda: batches((4,)), nn.CrossEntropyLoss()),
    "mlp-mse": (lambda: mlp(nn.GELU), regression, nn.MSELoss()),
    "cnn-cross-entropy": (cnn, lambda: batches((1, 6, 6), sizes=(4,)), nn.CrossEntropyLoss()),
}


@pytest.mark.parametrize("case", CASES)
def test_ggn_products_equal_the_dense_ggn(case):
    build, data, criterion = CASES[case]
    model, bs = build(), data()
    truth = dense_ggn(model, bs, criterion)
    g = torch.Generator().manual_seed(3)
    with GGNOperator(model, bs, criterion) as op:
        for _ in range(3):
            v = torch.randn(op.dim, generator=g, dtype=F64)
            torch.testing.assert_close(op.matvec(v), truth @ v, rtol=1e-10, atol=1e-10)
        assert op.num_matvecs == 3
    # the GGN of a convex loss is positive semi-definite, and its λ₁ is the dense one's
    assert float(torch.linalg.eigvalsh(truth).min()) > -1e-12
    with GGNOperator(model, bs, criterion) as op:
        top = top_eigenvalues(op, 2, num_iters=op.dim, tol=None)
    expected = torch.linalg.eigvalsh(truth).flip(0)[:2]
    assert [r.eigenvalue for r in top] == pytest.approx(expected.tolist(), rel=1e-10)


def test_ggn_of_a_linear_model_with_squared_error_is_its_hessian():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(F64)
    ((x, y),) = regression()
    params = list(model.parameters())
    h = torch.autograd.functional.hessian(
        lambda flat: nn.functional.mse_loss(
            functional_call(model, {"weight": flat[:12].view(3, 4), "bias": flat[12:]}, (x,)), y
        ),
        flatten(params, params).detach(),
    )
    with GGNOperator(model, [(x, y)], nn.MSELoss()) as op:
        v = torch.randn(op.dim, dtype=F64)
        torch.testing.assert_close(op.matvec(v), h @ v, rtol=1e-12, atol=1e-12)


def test_ggn_fixes_dropout_masks_and_restores_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).to(F64)
    bs = batches((4,), sizes=(8, 5))  # two batches: each product runs the forward passes anew
    model.eval()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    rng = torch.get_rng_state()
    with GGNOperator(model, bs, mode="train") as op:
        first, second = op.matvec(v), op.matvec(v)
        assert model.training
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_ggn_refuses_a_loss_not_of_the_form_loss_of_outputs():
    model = mlp()
    bs = batches((4,))

    def penalized(outputs, targets):
        penalty = sum((p**2).sum() for p in model.parameters())
        return nn.functional.cross_entropy(outputs, targets) + 1e-3 * penalty

    with GGNOperator(model, bs, penalized) as op:
        with pytest.raises(NotLossOfOutputsError, match="ℓ\\(f\\(x\\), y\\)"):
            op.matvec(torch.ones(op.dim, dtype=F64))


def test_ggn_refuses_a_model_whose_output_is_not_a_tensor():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3).to(F64)

        def forward(self, x):
            return {"logits": self.linear(x)}

    with GGNOperator(DictOut(), batches((4,))) as op:
        with pytest.raises(NotLossOfOutputsError, match="must be a tensor.*dict"):
            op.matvec(torch.ones(op.dim, dtype=F64))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(model=lambda x: x), TypeError, "model must be a torch.nn.Module"),
        (dict(criterion=nn.CrossEntropyLoss(reduction="sum")), ValueError, "reduction"),
        (dict(mode="test"), ValueError, "mode"),
    ],
)
def test_ggn_bad_arguments(kwargs, error, match):
    arguments = dict(model=mlp(), batches=batches((4,))) | kwargs
    with pytest.raises(error, match=match):
        GGNOperator(**arguments)


def test_ggn_product_outside_the_context_raises():
    op = GGNOperator(mlp(), batches((4,)))
    with pytest.raises(RuntimeError, match="inside"):
        op.matvec(torch.ones(op.dim, dtype=F64))
