"""Finite-difference Hessian-vector products on a smooth transformer, against the exact product.

Why: ``hvp="auto"`` falls back to finite differences when a model has no double backward, as
every model calling ``F.scaled_dot_product_attention`` on CPU/CUDA (fused kernels). This script
picks the form (central / forward) and step scale of that fallback by measurement.

Model: a token embedding, ``--layers`` ``nn.TransformerEncoderLayer`` (GeLU, no dropout, causal
mask, which call SDPA) and a linear head, trained ``--warmup`` AdamW steps on random next-token
data so the point is not the initialization; loss: next-token cross-entropy on one fixed batch,
float32. The exact product is double backward with SDPA's math backend
(``sdpa_kernel(SDPBackend.MATH)``). Columns: for each backend and ``fd_scale``, the median over
``--vectors`` random unit directions of ``‖Hv_fd − Hv‖/‖Hv‖``, the same along the top
eigenvector (20 exact power steps), the relative error of the eigenvalue found by 20 power steps
with that backend, and the time per product over the time of one gradient.

The table is printed and saved to ``benchmarks/results/fd-transformer-<layers>x<width>.json``
and ``.md`` (``--out``; see ``tables.py``), which docs/cost.md includes. Run:

    python benchmarks/bench_fd_transformer.py [--layers 2] [--width 64] [--vectors 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from tables import RESULTS, new_report, publish
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from eigensam.hessian.eigen import power_iteration
from eigensam.hessian.hvp import FD_SCALE, HessianOperator


class TinyLM(nn.Module):
    """Embedding, causal ``TransformerEncoderLayer`` blocks (GeLU, SDPA) and a linear head."""

    def __init__(self, vocab: int, width: int, layers: int, context: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        block = nn.TransformerEncoderLayer(
            width, 4, 4 * width, dropout=0.0, activation="gelu", batch_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.position[:n]
        return self.head(self.blocks(h, mask=self.mask[:n, :n], is_causal=True))


COLUMNS = {
    "backend": "backend",
    "fd_scale": "fd_scale",
    "random_error": "rel. error, random v (median)",
    "top_error": "rel. error along v₁",
    "eig_error": "λ₁ rel. error (20 power steps)",
    "time_over_grad": "time / gradient",
}
FORMATS = {"random_error": ".2e", "top_error": ".2e", "eig_error": ".2e", "time_over_grad": ".2f"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--vectors", type=int, default=5)
    parser.add_argument("--scales", default="1e-2,1e-3,1e-4,1e-5")
    parser.add_argument("--out", type=Path, help="default: results/fd-transformer-LxW.json")
    args = parser.parse_args()
    start = time.perf_counter()
    report = new_report(parser, args)
    torch.manual_seed(0)
    vocab = 64
    model = TinyLM(vocab, args.width, args.layers, args.context)
    # Data with structure to learn: each token is the previous one plus 1 or 2 (mod vocab).
    steps = torch.randint(1, 3, (512, args.context + 1))
    data = (torch.randint(0, vocab, (512, 1)) + steps.cumsum(1)) % vocab
    criterion = nn.CrossEntropyLoss()
    adam = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(args.warmup):
        rows = data[torch.randint(0, len(data), (args.batch,))]
        loss = criterion(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        adam.zero_grad()
        loss.backward()
        adam.step()
    batch = data[: args.batch]

    def closure() -> Tensor:
        loss = criterion(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        return loss

    params = list(model.parameters())
    dim = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(1)
    directions = [torch.randn(dim, generator=gen) for _ in range(args.vectors)]
    directions = [v / v.norm() for v in directions]
    with (
        sdpa_kernel(SDPBackend.MATH),
        HessianOperator(closure, params, backend="autograd", model=model, mode="eval") as exact,
    ):
        exact_products = [exact.matvec(v) for v in directions]
        top = power_iteration(exact.matvec, directions[0], 20)
        top_product = exact.matvec(top.eigenvector)
    timer = time.perf_counter()
    for _ in range(3):
        model.zero_grad()
        closure()
    gradient_time = (time.perf_counter() - timer) / 3
    model.zero_grad()
    rows = []
    for backend in ("fd-central", "fd-forward"):
        for scale in [float(s) for s in args.scales.split(",")]:
            with HessianOperator(
                closure, params, backend=backend, model=model, mode="eval", fd_scale=scale
            ) as op:
                timer = time.perf_counter()
                products = [op.matvec(v) for v in directions]
                per_product = (time.perf_counter() - timer) / len(directions)
                errors = [
                    float((p - e).norm() / e.norm())
                    for p, e in zip(products, exact_products, strict=True)
                ]
                along = float(
                    (op.matvec(top.eigenvector) - top_product).norm() / top_product.norm()
                )
                found = power_iteration(op.matvec, directions[0], 20)
            default = " (default)" if FD_SCALE[backend] == scale else ""
            rows.append(
                {
                    "backend": backend,
                    "fd_scale": f"{scale:g}{default}",
                    "random_error": statistics.median(errors),
                    "top_error": along,
                    "eig_error": abs(found.eigenvalue - top.eigenvalue) / abs(top.eigenvalue),
                    "time_over_grad": per_product / gradient_time,
                }
            )
    setting = (
        f"TinyLM: {args.layers} layers, width {args.width}, context {args.context}, batch "
        f"{args.batch}, {dim:,} parameters, float32, loss {float(loss):.3f} after {args.warmup} "
        f"AdamW steps; λ₁ (exact, 20 power steps) = {top.eigenvalue:.4g}, relative residual "
        f"{top.residual / abs(top.eigenvalue):.2g}."
    )
    out = args.out or RESULTS / f"fd-transformer-{args.layers}x{args.width}.json"
    publish(report, out, start, {"accuracy": (COLUMNS, rows)}, FORMATS, {"setting": setting})


if __name__ == "__main__":
    main()
