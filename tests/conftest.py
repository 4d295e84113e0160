"""Fixtures shared by the test folders."""

import pytest
import torch


class NoDoubleBackward(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again (``once_differentiable``), like a
    fused kernel without double backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - x.tanh() ** 2)


@pytest.fixture
def no_double_backward():
    """``apply`` of :class:`NoDoubleBackward`."""
    return NoDoubleBackward.apply
