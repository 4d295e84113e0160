"""Shared fixtures: quadratics with known Hessians and tiny networks."""

import pytest
import torch
from torch import nn


def quadratic(eigenvalues, seed=0):
    """A = Q diag(λ) Qᵀ (float64), b, and the closure of f(w) = ½wᵀAw + bᵀw for parameter w."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    w = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def closure():
        loss = 0.5 * w @ a @ w + b @ w
        loss.backward()
        return loss

    return a, b, w, closure, q


class SmallNet(nn.Module):
    def __init__(self, batchnorm=False, dropout=0.0, bn_momentum=0.1):
        super().__init__()
        layers = [nn.Linear(6, 8)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(8, momentum=bn_momentum))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def make_closure(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def loss_closure(model):
    """The closure of a batch ``(x, y)`` for ``step(closure, batch=(x, y))``."""

    def closure(x, y):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure
