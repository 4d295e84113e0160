"""Ground truth for the Hessian tests: full Hessians by torch.autograd.functional.hessian."""

import torch
from torch import nn
from torch.func import functional_call

from eigensam.hessian.hvp import BufferSnapshot, flatten


def full_hessian(model, x, y):
    """∇² of the mean cross-entropy on (x, y) by torch.autograd.functional.hessian, with the
    model in whatever mode it is in; buffers (BatchNorm statistics) are left unchanged."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    snapshot = BufferSnapshot(model)

    def loss_of(flat):
        chunks = flat.split([p.numel() for p in params])
        named = {n: c.view_as(p) for n, c, p in zip(names, chunks, params, strict=True)}
        return nn.functional.cross_entropy(functional_call(model, named, (x,)), y)

    h = torch.autograd.functional.hessian(loss_of, flatten(params, params).detach())
    snapshot.restore()
    return h


def weighted_hessian(model, batches):
    """``Σ_i (n_i/N) ∇²L_i`` over the batches, in the model's current mode."""
    total = sum(x.shape[0] for x, _ in batches)
    return sum(x.shape[0] / total * full_hessian(model, x, y) for x, y in batches)
