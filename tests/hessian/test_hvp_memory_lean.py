"""Memory-lean exact products (SplitClosure) against the whole batch's double backward."""

import weakref

import pytest
import torch
from torch import nn

from eigensam.hessian.closures import SplitClosure, split_closure
from eigensam.hessian.eigen import power_iteration
from eigensam.hessian.hvp import HessianOperator, flatten, flatten_releasing
from eigensam.hessian.tracker import EigenTracker


def net(batchnorm=False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 4, 3), nn.GELU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5)]
    if batchnorm:
        layers.insert(1, nn.BatchNorm2d(4))
    return nn.Sequential(*layers).double()


def batch(n=20):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,))


def products(closure, model, vectors, mode="train"):
    params = list(model.parameters())
    with HessianOperator(closure, params, backend="autograd", model=model, mode=mode) as op:
        return [op.matvec(v) for v in vectors], op.num_closure_calls


@pytest.mark.parametrize("parts", [1, 3, 20])
def test_split_products_equal_whole_batch_products_float64(parts):
    # The product is linear in the loss: summing the parts' products is the whole batch's
    # product up to float64 rounding (relative 1e-12).
    model = net()
    x, y = batch()
    split = split_closure(model, nn.functional.cross_entropy, x, y, parts)
    g = torch.Generator().manual_seed(2)
    dim = sum(p.numel() for p in model.parameters())
    vectors = [torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(3)]
    whole, whole_calls = products(split.closure, model, vectors)
    lean, lean_calls = products(split, model, vectors)
    for a, b in zip(whole, lean, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12 * float(a.abs().max()))
    # Graph rebuilt per product and part; one part is the whole batch, whose graph is kept.
    assert whole_calls == 1 and lean_calls == (1 if parts == 1 else 3 * parts)


def test_split_with_batchnorm_in_train_mode_is_refused_and_exact_in_eval_mode():
    model = net(batchnorm=True)
    x, y = batch()
    split = split_closure(model, nn.functional.cross_entropy, x, y, 4)
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    running = model[1].running_mean.clone()
    with pytest.raises(ValueError, match=r"BatchNorm layers in train mode \(1\)"):
        products(split, model, [v])
    assert model.training and torch.equal(model[1].running_mean, running)
    (whole,), _ = products(split.closure, model, [v], mode="eval")
    (lean,), _ = products(split, model, [v], mode="eval")
    torch.testing.assert_close(lean, whole, rtol=1e-12, atol=1e-12 * float(whole.abs().max()))
    assert model.training and torch.equal(model[1].running_mean, running)


def test_tracker_on_split_closure_matches_whole_batch():
    model = net()
    x, y = batch()
    split = split_closure(model, nn.functional.cross_entropy, x, y, 4)
    params = list(model.parameters())
    # Train mode (the model's own): the whole batch's evaluation at w is kept for reuse.
    whole, lean = EigenTracker(1, 4, seed=3, mode="train"), EigenTracker(1, 4, seed=3, mode="train")
    for _ in range(2):
        a = whole.update(split.closure, params, model)
        b = lean.update(split, params, model)
        assert b.eigenvalue == pytest.approx(a.eigenvalue, rel=1e-12)
        torch.testing.assert_close(lean.vector, whole.vector, rtol=0, atol=1e-12)
    assert whole.evaluation is not None and lean.evaluation is None


def test_split_closure_arguments_are_checked():
    model = net()
    x, y = batch()
    with pytest.raises(ValueError, match=r"parts must be an int in \[1, 20\].*got 21"):
        split_closure(model, nn.functional.cross_entropy, x, y, 21)
    with pytest.raises(ValueError, match="parts must be a non-empty sequence"):
        SplitClosure(lambda: torch.zeros(()), [])
    with pytest.raises(TypeError, match="closure must be callable"):
        SplitClosure(None, [lambda: torch.zeros(())])


def test_one_part_is_the_whole_batch_with_its_evaluation_kept_for_reuse():
    model = net()
    x, y = batch()
    one = split_closure(model, nn.functional.cross_entropy, x, y, 1)
    params = list(model.parameters())
    whole = EigenTracker(1, 3, seed=3, mode="train")
    single = EigenTracker(1, 3, seed=3, mode="train")
    a = whole.update(one.closure, params, model)
    b = single.update(one, params, model)
    assert b.eigenvalue == a.eigenvalue and torch.equal(single.vector, whole.vector)
    assert single.evaluation is not None  # the first pass can be reused, as with a plain closure


def test_flatten_releasing_equals_flatten_and_empties_the_list():
    like = [torch.zeros(2, 3), torch.zeros(4, dtype=torch.float64), torch.zeros(1)]
    tensors = [torch.randn(2, 3), None, torch.randn(1)]
    expected = flatten(tensors, like)
    out = flatten_releasing(tensors, like)
    assert out.dtype == expected.dtype == torch.float64  # promoted as torch.cat does
    assert torch.equal(out, expected)
    assert tensors == [None, None, None]


def test_power_iteration_releases_each_product_before_the_next():
    # The previous product is not alive while the next is computed (one vector less at peak).
    alive = []

    def matvec(v):
        alive.append(sum(1 for r in refs if r() is not None))
        hv = 2.0 * v
        refs.append(weakref.ref(hv))
        return hv

    refs = []
    power_iteration(matvec, torch.ones(5), 3)
    assert alive == [0, 0, 0]
