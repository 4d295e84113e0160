"""BlockOperator: per-block λ₁ and trace against the dense Hessian's diagonal blocks."""

import pytest
import torch
from hessian_truth import full_hessian
from torch import nn

from eigensam.hessian import DatasetHessian, HessianOperator, top_eigenvalues, trace
from eigensam.hessian.blocks import BlockOperator, layer_blocks, select_parameters
from eigensam.hessian.ggn import GGNOperator

F64 = torch.float64


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)
    ).to(F64)


def data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def block_index(model, names):
    """Positions of the named parameters in the flat parameter vector."""
    index, start = [], 0
    for name, p in model.named_parameters():
        if name in names:
            index.extend(range(start, start + p.numel()))
        start += p.numel()
    return torch.tensor(index)


@pytest.mark.parametrize("block", ["0", "2", "4", "*.bias", ["0", "4.weight"]])
def test_block_top_eigenvalue_equals_the_dense_blocks(block):
    model = net()
    x, y = data()
    h = full_hessian(model, x, y)
    with BlockOperator(DatasetHessian(model, [(x, y)]), model, block) as op:
        top = top_eigenvalues(op, 1, num_iters=op.dim, tol=None)[0]
        index = block_index(model, op.names)
        assert op.dim == len(index)
        estimate = trace(op, 3 * op.dim)  # Hutch++ with a full-rank sketch: exact
    dense = h[index][:, index]
    assert top.eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-10)
    # λ₁ of a diagonal block is at most λ₁ of H (Cauchy interlacing)
    assert top.eigenvalue <= float(torch.linalg.eigvalsh(h)[-1]) + 1e-12
    assert estimate.estimate == pytest.approx(float(dense.trace()), rel=1e-8)


def test_block_of_an_open_hessian_operator_and_of_the_ggn():
    model = net()
    x, y = data()

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    v = torch.randn(6 * 5 + 5, dtype=F64)
    h = full_hessian(model, x, y)
    index = block_index(model, ["2.weight", "2.bias"])
    with HessianOperator(closure, model.parameters(), backend="autograd", model=model) as full:
        block = BlockOperator(full, model, "2")
        torch.testing.assert_close(block.matvec(v), h[index][:, index] @ v)
    with BlockOperator(GGNOperator(model, [(x, y)]), model, "2") as ggn_block:
        with GGNOperator(model, [(x, y)]) as ggn:
            full_v = torch.zeros(ggn.dim, dtype=F64).index_copy_(0, index, v)
            expected = ggn.matvec(full_v)[index]
        torch.testing.assert_close(ggn_block.matvec(v), expected)


def test_layer_blocks_partition_the_parameters():
    model = net()
    assert layer_blocks(model) == ["0", "2", "4"]
    names = [n for block in layer_blocks(model) for n, _ in select_parameters(model, block)]
    assert names == [n for n, _ in model.named_parameters()]
    assert layer_blocks(nn.Linear(2, 2)) == ["weight", "bias"]


def test_module_prefix_does_not_match_a_longer_sibling_name():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])
    assert [n for n, _ in select_parameters(model, "1")] == ["1.weight", "1.bias"]


def test_a_pattern_matching_no_parameter_is_one_clear_error():
    model = net()
    with pytest.raises(
        ValueError, match="block pattern 'conv\\*' matches no trainable parameter.*0, 2, 4"
    ):
        select_parameters(model, ["0", "conv*"])
    with DatasetHessian(model, [data()]) as op:
        with pytest.raises(ValueError, match="'classifier'"):
            BlockOperator(op, model, "classifier")


@pytest.mark.parametrize(
    "block, error", [([], TypeError), (3, TypeError), ([""], TypeError), (["0", None], TypeError)]
)
def test_bad_block_arguments(block, error):
    with pytest.raises(error, match="block"):
        select_parameters(net(), block)


def test_op_without_params_is_refused():
    with pytest.raises(TypeError, match="op must be an operator"):
        BlockOperator(torch.eye(3), net(), "0")
