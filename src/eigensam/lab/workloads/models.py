"""Image classifiers for the experiments: SimpleCNN, MLP, ResNet-18/50, WideResNet, small ViT.

All models use plain differentiable ops that support double backward (attention is written
with matmul + softmax rather than fused kernels), so Hessian-vector products work through them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_width(width: object) -> float:
    if isinstance(width, bool) or not isinstance(width, int | float):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    if not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    return float(width)


def _scaled(channels: float, width: float) -> int:
    """``round(channels · width)``, at least 1."""
    return max(1, round(channels * width))


def _init_conv_bn(module: nn.Module) -> None:
    """He-normal (fan-out) conv weights; BatchNorm scale 1, shift 0; linear biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def kaiming_init(model: nn.Module) -> None:
    """He initialization (He et al. 2015): conv and linear weights ``N(0, 2/fan_in)``, except
    the last linear layer (the logits, no ReLU after it): ``N(0, 1/fan_in)``; biases 0. The
    paper's SimpleCNN with PyTorch's default initialization sits on a loss plateau for its first
    ~70 steps at lr 0.03; this removes it."""
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    for m in layers:
        gain = "linear" if m is layers[-1] else "relu"
        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity=gain)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# SimpleCNN and MLP


class SimpleCNN(nn.Module):
    """The paper's 6-layer CNN (Jastrzebski et al. 2021; Deng et al. 2024).

    With ``c1 = 32·width``, ``c2 = 64·width``, ``f = 128·width`` and ``s = image_size // 4``:

    1. conv 3×3 (in_channels -> c1, padding 1), ReLU
    2. conv 3×3 (c1 -> c1, padding 1), ReLU, max-pool 2×2
    3. conv 3×3 (c1 -> c2, padding 1), ReLU
    4. conv 3×3 (c2 -> c2, padding 1), ReLU, max-pool 2×2
    5. flatten, linear (c2·s·s -> f), ReLU
    6. linear (f -> num_classes)

    No normalization layers. ``image_size`` is 28 (MNIST-like) or 32 (CIFAR-like), or any
    size >= 4.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        num_classes = _check_int("num_classes", num_classes, 1)
        in_channels = _check_int("in_channels", in_channels, 1)
        image_size = _check_int("image_size", image_size, 4)
        width = _check_width(width)
        c1, c2, hidden = _scaled(32, width), _scaled(64, width), _scaled(128, width)
        side = image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """One hidden layer: flatten, linear (C·H·W -> hidden), GeLU, linear (hidden -> classes).

    The paper (§6.1) uses 784 hidden units on MNIST.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: int = 784,
    ) -> None:
        super().__init__()
        num_classes = _check_int("num_classes", num_classes, 1)
        in_channels = _check_int("in_channels", in_channels, 1)
        image_size = _check_int("image_size", image_size, 1)
        hidden = _check_int("hidden", hidden, 1)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden),
            nn.GELU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# --------------------------------------------------------------------------------------------
# ResNets (CIFAR variant: 3×3 stride-1 stem, no max-pool)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Identity, or 1×1 conv + BatchNorm when the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """``relu(bn(conv3×3(relu(bn(conv3×3(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand (×4), each with BatchNorm; residual, ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: conv3×3 stem (stride 1), four stages, global average pool, linear.

    Stage i has ``64·2^i·width`` planes, ``num_blocks[i]`` blocks and stride 1, 2, 2, 2.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        num_classes = _check_int("num_classes", num_classes, 1)
        in_channels = _check_int("in_channels", in_channels, 1)
        width = _check_width(width)
        planes = [_scaled(64 * 2**i, width) for i in range(4)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, planes[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(planes[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        in_planes = planes[0]
        for i, (stage_planes, blocks) in enumerate(zip(planes, num_blocks, strict=True)):
            layers = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(block(in_planes, stage_planes, stride))
                in_planes = stage_planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(out, 1))


class ResNet18(ResNet):
    """ResNet-18: BasicBlocks (2, 2, 2, 2); 11.17M parameters at width 1 with 10 classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, width)


class ResNet50(ResNet):
    """ResNet-50: Bottlenecks (3, 4, 6, 3); 23.52M parameters at width 1 with 10 classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, width)


# --------------------------------------------------------------------------------------------
# WideResNet (Zagoruyko and Komodakis 2016, pre-activation, CIFAR)


class _WideBlock(nn.Module):
    """Pre-activation block: ``o = relu(bn(x))``, ``conv(dropout(relu(bn(conv(o))))) + s``.

    The shortcut ``s`` is ``x`` when shapes match, else a 1×1 conv of ``o``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(o)))
        out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-k: conv3×3 stem (16), three groups of ``(depth - 4) / 6`` pre-activation blocks.

    Groups have ``16k``, ``32k``, ``64k`` channels (times ``width``) and strides 1, 2, 2; then
    BatchNorm, ReLU, global average pool and a linear layer. WRN-28-10 has 36.5M parameters.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        depth = _check_int("depth", depth, 10)
        if (depth - 4) % 6 != 0:
            raise ValueError(
                f"depth must satisfy (depth - 4) % 6 == 0 (e.g. 16, 22, 28), got {depth}"
            )
        widen_factor = _check_int("widen_factor", widen_factor, 1)
        if not (isinstance(dropout, int | float) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        num_classes = _check_int("num_classes", num_classes, 1)
        in_channels = _check_int("in_channels", in_channels, 1)
        width = _check_width(width)
        blocks = (depth - 4) // 6
        stem = _scaled(16, width)
        channels = [_scaled(16 * 2**i * widen_factor, width) for i in range(3)]
        self.stem = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        groups: list[nn.Module] = []
        in_planes = stem
        for i, planes in enumerate(channels):
            layers = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(_WideBlock(in_planes, planes, stride, float(dropout)))
                in_planes = planes
            groups.append(nn.Sequential(*layers))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.groups(self.stem(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


# --------------------------------------------------------------------------------------------
# Vision Transformer


class _Attention(nn.Module):
    """Multi-head self-attention ``softmax(q kᵀ / √d_head) v`` with plain matmuls."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class _TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` with a GeLU MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Small Vision Transformer for 28/32-pixel images.

    Non-overlapping ``patch_size`` patches are embedded linearly (a strided conv) to ``dim``,
    a CLS token is prepended and a learnable position embedding added; ``depth`` pre-norm blocks
    with ``heads`` heads and MLP width ``mlp_ratio·dim`` follow; the final LayerNorm of the CLS
    token feeds a linear head. Defaults (dim 64, depth 4, heads 4) are CPU-sized.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        num_classes = _check_int("num_classes", num_classes, 1)
        in_channels = _check_int("in_channels", in_channels, 1)
        image_size = _check_int("image_size", image_size, 1)
        patch_size = _check_int("patch_size", patch_size, 1)
        dim = _check_int("dim", dim, 1)
        depth = _check_int("depth", depth, 1)
        heads = _check_int("heads", heads, 1)
        if image_size % patch_size != 0:
            raise ValueError(
                f"image_size must be divisible by patch_size={patch_size}, got {image_size}"
            )
        if dim % heads != 0:
            raise ValueError(f"dim must be divisible by heads={heads}, got {dim}")
        if not (isinstance(mlp_ratio, int | float) and mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        mlp_dim = max(1, round(mlp_ratio * dim))
        self.blocks = nn.Sequential(*(_TransformerBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # B×P×dim
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


# --------------------------------------------------------------------------------------------
# Registry

ModelBuilder = Callable[..., nn.Module]


def _build_simplecnn(
    num_classes: int, in_channels: int, image_size: int, width: float, **kw: Any
) -> nn.Module:
    return SimpleCNN(num_classes, in_channels, image_size, width=width, **kw)


def _build_mlp(
    num_classes: int, in_channels: int, image_size: int, width: float, **kw: Any
) -> nn.Module:
    hidden = _scaled(kw.pop("hidden", 784), width)
    return MLP(num_classes, in_channels, image_size, hidden=hidden, **kw)


def _build_resnet18(
    num_classes: int, in_channels: int, image_size: int, width: float, **kw: Any
) -> nn.Module:
    return ResNet18(num_classes, in_channels, width=width, **kw)


def _build_resnet50(
    num_classes: int, in_channels: int, image_size: int, width: float, **kw: Any
) -> nn.Module:
    return ResNet50(num_classes, in_channels, width=width, **kw)


def _build_wrn28_10(
    num_classes: int, in_channels: int, image_size: int, width: float, **kw: Any
) -> nn.Module:
    kw = {"depth": 28, "widen_factor": 10, **kw}
    return WideResNet(num_classes=num_classes, in_channels=in_channels, width=width, **kw)


def _build_vit_small(
    num_classes: int, in_channels: int, image_size: int, width: float, **kw: Any
) -> nn.Module:
    heads = kw.pop("heads", 4)
    dim = heads * _scaled(kw.pop("dim", 64) / heads, width)
    return ViT(num_classes, in_channels, image_size, dim=dim, heads=heads, **kw)


MODELS: dict[str, ModelBuilder] = {
    "simplecnn": _build_simplecnn,
    "mlp": _build_mlp,
    "resnet18": _build_resnet18,
    "resnet50": _build_resnet50,
    "wrn28-10": _build_wrn28_10,
    "vit-small": _build_vit_small,
}


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: float = 1.0,
    **kw: Any,
) -> nn.Module:
    """Build ``MODELS[name]``; ``width`` scales channel / hidden sizes, ``kw`` goes to the class.

    ResNets and WideResNet pool globally and ignore ``image_size``. For the MLP ``width`` scales
    ``hidden``; for the ViT it scales ``dim`` (kept a multiple of ``heads``).
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}; got {name!r}")
    width = _check_width(width)
    _check_int("num_classes", num_classes, 1)
    _check_int("in_channels", in_channels, 1)
    _check_int("image_size", image_size, 1)
    return MODELS[name](num_classes, in_channels, image_size, width, **kw)
