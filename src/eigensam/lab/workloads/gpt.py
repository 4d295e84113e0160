"""A small GPT-style causal language model whose attention is
``F.scaled_dot_product_attention`` (the fused kernels of which have no double backward on CPU,
so eigensam's ``hvp="auto"`` computes its Hessian-vector products by finite differences).

Pre-norm transformer (Radford et al. 2019): token and learned position embeddings, ``layers``
blocks ``x ← x + Attn(LN(x))``, ``x ← x + MLP(LN(x))`` with causal multi-head attention
``softmax(QKᵀ/√d_head + M)V`` (``M`` = −∞ above the diagonal) and a GELU MLP of width
``4·width``, a final LayerNorm and an output layer tied to the token embedding. Weights start
from N(0, 0.02²), biases at 0 (residual projections at N(0, (0.02/√(2·layers))²), as GPT-2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eigensam.lab.workloads.text import VOCAB_SIZE


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """``TinyGPT(vocab_size=256, context=128, width=128, layers=4, heads=4)``: maps token ids
    ``idx`` of shape ``(B, T)``, ``T ≤ context``, to next-token logits ``(B, T, vocab_size)``
    (see the module documentation)."""

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        context: int = 128,
        width: int = 128,
        layers: int = 4,
        heads: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.vocab_size = _positive("vocab_size", vocab_size)
        self.context = _positive("context", context)
        _positive("width", width), _positive("layers", layers), _positive("heads", heads)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.tokens.weight
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() >= 2:
                residual = name.endswith(("attn.proj.weight", "mlp.2.weight"))
                std = 0.02 / math.sqrt(2 * layers) if residual else 0.02
                nn.init.normal_(param, 0.0, std)

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(
                f"idx has sequence length {t}, longer than the model's context={self.context}; "
                "cut the sequences or build the model with a larger context"
            )
        position = torch.arange(t, device=idx.device)
        x = self.drop(self.tokens(idx) + self.positions(position))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy ``−(1/BT) Σ log softmax(logits)[target]`` (nats/byte)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
