"""DatasetHessian: the batch-size-weighted Hessian over several batches, its side effects and its
determinism check, against full Hessians from torch.autograd.functional.hessian."""

import pytest
import torch
from hessian_truth import full_hessian
from hessian_truth import weighted_hessian as weighted_hessian_in_current_mode
from torch import nn

from eigensam.hessian.dataset import DatasetHessian, NondeterministicHessianError

F64 = torch.float64
SIZES = (5, 8, 11)


def mlp(batchnorm=False, dropout=None):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(6))
    layers.append(nn.GELU())
    if dropout is not None:
        layers.append(dropout)
    layers.append(nn.Linear(6, 3))
    return nn.Sequential(*layers).to(F64)


def make_batches(sizes=SIZES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g))
        for n in sizes
    ]


def weighted_hessian(model, batches, mode):
    """``Σ_i (n_i/N) H_i`` in ``mode``; the model's mode is restored."""
    training = model.training
    model.train(mode == "train")
    h = weighted_hessian_in_current_mode(model, batches)
    model.train(training)
    return h


def vector(dim, seed=2):
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize(
    "backend, rtol", [("autograd", 1e-11), ("fd-central", 1e-3), ("fd-forward", 1e-2)]
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_weighted_average_of_batch_hessians(backend, rtol, mode):
    """Three batches of unequal size, BatchNorm (batch statistics in train mode, running
    statistics in eval mode): H v = Σ (n_i/N) H_i v."""
    model = mlp(batchnorm=True)
    batches = make_batches()
    h = weighted_hessian(model, batches, mode)
    v = vector(h.shape[0])
    with DatasetHessian(model, batches, backend=backend, mode=mode) as op:
        assert op.dim == h.shape[0] and op.dtype == F64 and op.device == torch.device("cpu")
        hv = op.matvec(v)
    assert float((hv - h @ v).norm() / (h @ v).norm()) < rtol
    assert op.num_samples == sum(SIZES) and op.batch_sizes == list(SIZES)
    assert op.weights == pytest.approx([n / sum(SIZES) for n in SIZES])


def test_weighting_equals_the_hessian_of_the_pooled_mean_loss():
    """Without batch-dependent layers, the weighted average is the Hessian of the mean loss over
    all samples pooled into one batch."""
    model = mlp()
    batches = make_batches()
    pooled = full_hessian(
        model, torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    )
    v = vector(pooled.shape[0])
    with DatasetHessian(model, batches) as op:
        hv = op.matvec(v)
    torch.testing.assert_close(hv, pooled @ v, rtol=1e-11, atol=1e-13)


def test_one_batch_keeps_its_graph_and_many_batches_rebuild_theirs():
    model = mlp()
    batches = make_batches()
    v = vector(sum(p.numel() for p in model.parameters()))
    with DatasetHessian(model, batches[:1]) as op:
        first = op.matvec(v)  # graph built, then rebuilt once by the determinism check
        for _ in range(3):
            assert torch.equal(op.matvec(v), first)
    assert op.num_batch_evaluations == 2
    assert (op.num_matvecs, op.num_check_matvecs) == (4, 1)
    with DatasetHessian(model, batches, check=False) as op:
        for _ in range(2):
            op.matvec(v)
    assert op.num_batch_evaluations == 2 * len(batches)
    assert (op.num_matvecs, op.num_check_matvecs) == (2, 0)


# ------------------------------------------------------------------------------ side effects


@pytest.mark.parametrize("backend", ["autograd", "fd-central"])
@pytest.mark.parametrize("num_batches", [1, 3])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_side_effects(backend, num_batches, mode):
    """BN buffers (incl. num_batches_tracked), RNG state, per-module modes and .grad are exactly
    as before; the model is left in the mode it was in, not the one requested; dropout masks are
    the same in every product."""
    model = mlp(batchnorm=True, dropout=nn.Dropout(0.3))
    batches = make_batches()[:num_batches]
    model.train(mode != "train")
    model[0].train(mode == "train")  # a mixed-mode model keeps its per-module flags
    modes = [m.training for m in model.modules()]
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 3.0)
    grads = [p.grad for p in params]
    saved_grad = params[0].grad.clone()
    buffers = [b.clone() for b in model.buffers()]
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    v = vector(sum(p.numel() for p in params))
    with DatasetHessian(model, batches, backend=backend, mode=mode) as op:
        assert all(m.training == (mode == "train") for m in model.modules())
        first, second = op.matvec(v), op.matvec(v)
        op.check_determinism()
        third = op.matvec(v)
    assert torch.equal(first, second) and torch.equal(first, third)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), buffers, strict=True))
    assert all(p.grad is g for p, g in zip(params, grads, strict=True))
    assert torch.equal(params[0].grad, saved_grad) and params[1].grad is None


def test_state_is_restored_when_the_body_raises():
    model = mlp(batchnorm=True)
    model.eval()
    rng = torch.get_rng_state()
    with pytest.raises(KeyError), DatasetHessian(model, make_batches()) as op:
        op.matvec(vector(op.dim))
        raise KeyError("boom")
    assert not model.training and torch.equal(torch.get_rng_state(), rng)


# ------------------------------------------------------------------------------ determinism


class PrivateDropout(nn.Module):
    """Dropout whose masks come from its own unseeded generator: resetting the global RNG does
    not fix them, so the operator changes from one product to the next."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = p
        self.generator = torch.Generator()

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand(x.shape, generator=self.generator, dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)


@pytest.mark.parametrize("backend", ["autograd", "fd-central"])
@pytest.mark.parametrize("num_batches", [1, 3])
def test_determinism_check_refuses_an_operator_that_changes(backend, num_batches):
    model = mlp(dropout=PrivateDropout())
    model.eval()
    rng = torch.get_rng_state()
    batches = make_batches()[:num_batches]
    v = vector(sum(p.numel() for p in model.parameters()))
    with (
        pytest.raises(NondeterministicHessianError, match="check=False"),
        DatasetHessian(model, batches, backend=backend) as op,
    ):
        op.matvec(v)
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    with DatasetHessian(model, batches, backend=backend, check=False) as op:
        op.matvec(v)  # accepted when asked
        with pytest.raises(NondeterministicHessianError):
            op.check_determinism()
    with DatasetHessian(model, batches, backend=backend, mode="eval") as op:
        op.matvec(v)  # the private dropout is train-mode only
        assert op.check_determinism() == 0.0


def test_determinism_check_passes_for_global_rng_dropout():
    model = mlp(dropout=nn.Dropout(0.5))
    with DatasetHessian(model, make_batches(), mode="train") as op:
        assert op.check_determinism(vector(op.dim)) == 0.0
        assert op.check_determinism(rtol=1e-15) == 0.0
    assert op.num_check_matvecs == 4


# ------------------------------------------------------------------------------ bad input


def test_bad_arguments():
    model = mlp()
    batches = make_batches()
    with pytest.raises(TypeError, match="model"):
        DatasetHessian(lambda x: x, batches)
    with pytest.raises(ValueError, match="at least one"):
        DatasetHessian(model, [])
    with pytest.raises(TypeError, match=r"batches\[1\]"):
        DatasetHessian(model, [batches[0], (batches[1][0],)])
    with pytest.raises(ValueError, match=r"batches\[0\].*\(5, 4\) and \(4,\)"):
        DatasetHessian(model, [(batches[0][0], batches[0][1][:4])])
    with pytest.raises(TypeError, match="batches"):
        DatasetHessian(model, batches[0][0])
    with pytest.raises(ValueError, match="reduction='mean'.*'sum'"):
        DatasetHessian(model, batches, nn.CrossEntropyLoss(reduction="sum"))
    with pytest.raises(TypeError, match="criterion"):
        DatasetHessian(model, batches, "cross-entropy")
    with pytest.raises(ValueError, match="backend"):
        DatasetHessian(model, batches, backend="jax")
    with pytest.raises(ValueError, match="mode"):
        DatasetHessian(model, batches, mode="test")
    with pytest.raises(ValueError, match="check_rtol"):
        DatasetHessian(model, batches, check_rtol=0)
    with pytest.raises(TypeError, match="check"):
        DatasetHessian(model, batches, check="yes")
    with pytest.raises(ValueError, match="requires_grad"):
        DatasetHessian(model, batches, params=[torch.zeros(3)])
    op = DatasetHessian(model, batches)
    with pytest.raises(RuntimeError, match="inside"):
        op.matvec(torch.zeros(op.dim, dtype=F64))
    with op, pytest.raises(ValueError, match=r"shape \(51,\), got \(3,\)"):
        op.matvec(torch.zeros(3, dtype=F64))
    with op, pytest.raises(RuntimeError, match="already open"), op:
        pass
