"""Tests for eigensam.lab.workloads.models: shapes, parameter counts, double backward,
argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eigensam.lab.workloads.models import (
    MLP,
    MODELS,
    ResNet18,
    ResNet50,
    SimpleCNN,
    ViT,
    WideResNet,
    build_model,
)

# Small widths keep every forward/backward pass well under a second on CPU.
SMALL_WIDTH = {
    "simplecnn": 0.25,
    "mlp": 0.1,
    "resnet18": 0.125,
    "resnet50": 0.125,
    "wrn28-10": 0.05,
    "vit-small": 0.5,
}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names() -> None:
    assert set(MODELS) == set(SMALL_WIDTH)


@pytest.mark.parametrize("name", sorted(SMALL_WIDTH))
@pytest.mark.parametrize(("channels", "size", "classes"), [(1, 28, 10), (3, 32, 100)])
def test_output_shape(name: str, channels: int, size: int, classes: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, classes, channels, size, width=SMALL_WIDTH[name])
    out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, classes)
    assert torch.isfinite(out).all()


def test_parameter_counts() -> None:
    assert num_params(build_model("resnet18", 10, 3, 32)) == 11_173_962  # ≈ 11.17M
    assert num_params(ResNet50()) == 23_520_842
    assert num_params(WideResNet(depth=28, widen_factor=10)) == 36_479_194
    # MLP on 28×28: 784·784 + 784 + 784·10 + 10.
    assert num_params(MLP()) == 623_290
    # Width 1/2 roughly quarters the convolution-dominated ResNet.
    assert 0.2 < num_params(ResNet18(width=0.5)) / 11_173_962 < 0.3


def test_simplecnn_layers() -> None:
    model = SimpleCNN(num_classes=10, in_channels=3, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (64 * 8 * 8, 128),
        (128, 10),
    ]
    mnist_like = SimpleCNN(in_channels=1, image_size=28, width=2.0)
    linears = [m for m in mnist_like.modules() if isinstance(m, nn.Linear)]
    assert linears[0].in_features == 128 * 7 * 7 and linears[0].out_features == 256


def test_vit_tokens_and_width() -> None:
    model = build_model("vit-small", 10, 3, 32)
    assert isinstance(model, ViT)
    assert model.pos_embed.shape == (1, 8 * 8 + 1, 64)
    assert len(model.blocks) == 4
    narrow = build_model("vit-small", 10, 3, 32, width=0.3)
    assert narrow.pos_embed.shape[-1] % 4 == 0  # type: ignore[union-attr]


def hvp_and_finite_difference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """Hessian-vector product by double backward and by central differences of gradients."""
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(create_graph: bool) -> tuple[torch.Tensor, ...]:
        loss = F.cross_entropy(model(x), y)
        return torch.autograd.grad(loss, params, create_graph=create_graph)

    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    g = grads(create_graph=True)
    hvp = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v, strict=True)), params)

    eps = 1e-7  # small enough that ReLU kinks are almost never crossed
    with torch.no_grad():
        for p, vi in zip(params, v, strict=True):
            p.add_(vi, alpha=eps)
    g_plus = grads(create_graph=False)
    with torch.no_grad():
        for p, vi in zip(params, v, strict=True):
            p.add_(vi, alpha=-2 * eps)
    g_minus = grads(create_graph=False)
    fd = [(a - b) / (2 * eps) for a, b in zip(g_plus, g_minus, strict=True)]
    return torch.cat([h.flatten() for h in hvp]), torch.cat([f.flatten() for f in fd])


@pytest.mark.parametrize("name", ["simplecnn", "mlp", "vit-small"])
def test_double_backward_matches_finite_differences(name: str) -> None:
    torch.manual_seed(0)
    channels, size = (3, 32) if name == "vit-small" else (1, 28)
    model = build_model(name, 10, channels, size, width=SMALL_WIDTH[name]).double()
    x = torch.randn(4, channels, size, size, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    hvp, fd = hvp_and_finite_difference(model, x, y)
    assert torch.isfinite(hvp).all() and hvp.norm() > 0
    assert (hvp - fd).norm() / hvp.norm() < 1e-6


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "wrn28-10"])
def test_double_backward_runs_through_batchnorm_models(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, 3, 32, width=SMALL_WIDTH[name])
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * g).sum() for g in grads), params)
    assert all(torch.isfinite(h).all() for h in hvp)


def test_wide_resnet_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=1, dropout=0.5, width=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: build_model("resnet34", 10, 3, 32), "resnet18"),
        (lambda: build_model("simplecnn", 10, 3, 32, width=0), "width"),
        (lambda: build_model("resnet18", 10, 3, 32, width=-1.0), "width"),
        (lambda: build_model("mlp", 10, 1, 28, width=float("nan")), "width"),
        (lambda: build_model("mlp", 0, 1, 28), "num_classes"),
        (lambda: build_model("mlp", 10, 0, 28), "in_channels"),
        (lambda: SimpleCNN(image_size=2), "image_size"),
        (lambda: MLP(hidden=0), "hidden"),
        (lambda: WideResNet(depth=27), "depth"),
        (lambda: WideResNet(dropout=1.0), "dropout"),
        (lambda: ViT(image_size=30, patch_size=4), "image_size"),
        (lambda: ViT(dim=10, heads=4), "dim"),
        (lambda: ResNet18(num_classes=0), "num_classes"),
    ],
)
def test_bad_arguments(build, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        build()
