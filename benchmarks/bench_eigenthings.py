"""eigensam vs hessian-eigenthings 1.0: accuracy at equal products and time per product.

Accuracy, in float64: a 2,058-dimensional matrix with the near-degenerate top spectrum 0.160,
0.155, 0.149, 0.141, 0.133; and the dense Hessian (``torch.autograd.functional.hessian``) of an
MLP 16-64-14-4 with tanh (2,058 parameters) on 256 random inputs with random labels,
cross-entropy. Both libraries get exact double-backward products of the same loss.

- top-5 eigenvalues by Lanczos (algebraically largest) after 10, 20, 30, 40 and 60 products
  (eigensam always reorthogonalizes fully; hessian-eigenthings by default up to 50 steps), and
  eigensam's default stopping rule (``tol=1e-3``, reported with the products it used): the
  largest relative error over the 5 and the error of λ₁, median over ``--repeats`` seeds (the
  same seed gives both libraries the same Gaussian start vector);
- trace: Hutch++ with 99 products, relative error, median over the repeats;
- density: SLQ with 4 Rademacher probes of 20 steps (80 products): the L1 distance between the
  Gaussian-smoothed estimate and the smoothed exact spectrum (same σ, 2% of the spectrum's
  width, same grid), median over the repeats.

The top-5 tables also give the largest absolute difference between the two libraries' Ritz
values (same seed, same budget), the largest over the repeats.

Time per product: mean seconds of 20 Lanczos steps (product plus reorthogonalization), the two
libraries interleaved, median over the repeats, on the same MLP and on the paper's SimpleCNN
(width 0.5, 128 random 28x28 images, float32). Ratios are within one run. The tables are
printed and saved to ``benchmarks/results/eigenthings.json`` and ``.md`` (``--out``; see
``tables.py``), which docs/hessian.md includes. Run:

    pip install "hessian-eigenthings==1.0.0a5"   # the `bench` extra
    python benchmarks/bench_eigenthings.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import hessian_eigenthings as he
import torch
from tables import RESULTS, new_report, publish
from torch import Tensor, nn
from torch.func import functional_call

from eigensam.hessian import HessianOperator, density, top_eigenvalues, trace
from eigensam.lab.workloads.models import build_model

BUDGETS = (10, 20, 30, 40, 60)
K = 5


def mlp_problem() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 14), nn.Tanh(), nn.Linear(14, 4)
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g, dtype=torch.float64)
    return model, x, torch.randint(0, 4, (256,), generator=g)


def cnn_problem() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = build_model("simplecnn", num_classes=10, in_channels=1, image_size=28, width=0.5)
    g = torch.Generator().manual_seed(1)
    return (
        model,
        torch.randn(128, 1, 28, 28, generator=g),
        torch.randint(0, 10, (128,), generator=g),
    )


def dense_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())

    def loss_of(flat: Tensor) -> Tensor:
        chunks = flat.split([p.numel() for p in params])
        named = {n: c.view_as(p) for n, c, p in zip(names, chunks, params, strict=True)}
        return nn.functional.cross_entropy(functional_call(model, named, (x,)), y)

    w = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(loss_of, w)


class Operators:
    """The same loss as an eigensam HessianOperator (open) and a hessian-eigenthings one."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor):
        def closure() -> Tensor:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        self.ours = HessianOperator(
            closure, model.parameters(), backend="autograd", model=model, mode=None
        ).__enter__()
        self.theirs = he.HessianOperator(
            model, [(x, y)], he.supervised_loss(nn.functional.cross_entropy)
        )


def relative_errors(values: list[float], truth: Tensor) -> float:
    return max(abs(v - float(t)) / abs(float(t)) for v, t in zip(values, truth, strict=True))


def smoothed(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    z = (grid.reshape(-1, 1) - nodes.reshape(1, -1)) / sigma
    return (torch.exp(-0.5 * z**2) * weights.reshape(1, -1)).sum(1) / (
        sigma * math.sqrt(2 * math.pi)
    )


def near_degenerate_matrix() -> Tensor:
    """A 2,058-dimensional symmetric matrix with the top spectrum 0.160, 0.155, 0.149, 0.141,
    0.133 and a bulk spread over [-0.02, 0.1], in a random orthonormal basis."""
    values = [0.160, 0.155, 0.149, 0.141, 0.133] + torch.linspace(0.1, -0.02, 2053).tolist()
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(2058, 2058, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T


EIGEN_COLUMNS = {
    "products": "products",
    "ours_top": f"eigensam: max rel. error, top {K}",
    "theirs_top": "hessian-eigenthings",
    "ours_first": "eigensam: λ₁ rel. error",
    "theirs_first": "hessian-eigenthings",
    "difference": "max abs. difference of the two libraries' Ritz values",
}
ESTIMATE_COLUMNS = {"estimate": "estimate", "ours": "eigensam", "theirs": "hessian-eigenthings"}
SPEED_COLUMNS = {
    "model": "model",
    "ours_seconds": "eigensam s/product",
    "theirs_seconds": "hessian-eigenthings s/product",
    "ratio": "ratio",
}
FORMATS = {
    **dict.fromkeys(["ours_top", "theirs_top", "ours_first", "theirs_first"], ".1e"),
    "difference": ".1e",
}
SPEED_FORMATS = {"ours_seconds": ".4f", "theirs_seconds": ".4f", "ratio": ".2f"}


def eigen_rows(
    ours: object, theirs: he.CurvatureOperator, top: Tensor, repeats: int
) -> list[dict[str, Any]]:
    """Relative errors of the top-K Ritz values of both libraries at every budget (medians over
    the seeds) and the largest difference between the two libraries' Ritz values."""
    rows: dict[str, list[list[float]]] = {}
    for seed in range(repeats):
        for m in BUDGETS:
            mine = [
                r.eigenvalue for r in top_eigenvalues(ours, K, num_iters=m, tol=None, seed=seed)
            ]
            other = he.lanczos(theirs, k=K, max_iter=m, which="LA", seed=seed).eigenvalues.tolist()
            rows.setdefault(f"{m}", []).append(
                [
                    relative_errors(mine, top),
                    relative_errors(other, top),
                    relative_errors(mine[:1], top[:1]),
                    relative_errors(other[:1], top[:1]),
                    max(abs(a - b) for a, b in zip(mine, other, strict=True)),
                ]
            )
        default = top_eigenvalues(ours, K, num_iters=40, seed=seed)
        rows.setdefault("default", []).append(
            [relative_errors([r.eigenvalue for r in default], top), default[0].num_matvecs]
        )
    table = []
    for m in BUDGETS:
        *medians, _ = (statistics.median(c) for c in zip(*rows[f"{m}"], strict=True))
        difference = max(r[-1] for r in rows[f"{m}"])
        keys = ["ours_top", "theirs_top", "ours_first", "theirs_first"]
        table.append(
            {"products": m, **dict(zip(keys, medians, strict=True)), "difference": difference}
        )
    errors, used = zip(*rows["default"], strict=True)
    table.append(
        {
            "products": f"eigensam default tol=1e-3 (≤ 40; used {statistics.median(used):.0f})",
            "ours_top": statistics.median(errors),
            **dict.fromkeys(["theirs_top", "ours_first", "theirs_first", "difference"], ""),
        }
    )
    return table


def top_note(what: str, top: Tensor) -> str:
    return f"{what}; top-{K} eigenvalues " + ", ".join(f"{v:.4g}" for v in top) + "."


def accuracy(repeats: int) -> tuple[dict[str, tuple[dict[str, str], list]], dict[str, str]]:
    """The top-K tables of the matrix and the MLP and the trace/density table, and the notes
    that give their exact spectra."""
    matrix = near_degenerate_matrix()
    top = torch.linalg.eigvalsh(matrix).flip(0)[:K]
    notes = {"matrix_setting": top_note("Matrix of 2,058 dimensions, float64", top)}
    theirs = he.LambdaOperator(lambda v: matrix @ v, 2058, dtype=torch.float64)
    tables = {"matrix": (EIGEN_COLUMNS, eigen_rows(matrix, theirs, top, repeats))}

    model, x, y = mlp_problem()
    h = dense_hessian(model, x, y)
    spectrum = torch.linalg.eigvalsh(h)
    top = spectrum.flip(0)[:K]
    ops = Operators(model, x, y)
    dim = h.shape[0]
    exact_trace = float(spectrum.sum())
    notes["mlp_setting"] = top_note(
        f"MLP Hessian of {dim:,} parameters, float64 (exact trace {exact_trace:.4g})", top
    )
    tables["mlp"] = (EIGEN_COLUMNS, eigen_rows(ops.ours, ops.theirs, top, repeats))
    sigma = 0.02 * float(spectrum[-1] - spectrum[0])
    grid = torch.linspace(
        float(spectrum[0]) - 5 * sigma, float(spectrum[-1]) + 5 * sigma, 4000, dtype=torch.float64
    )
    step = float(grid[1] - grid[0])
    exact_density = smoothed(spectrum, torch.full_like(spectrum, 1 / dim), grid, sigma)
    trace_errors: list[tuple[float, float]] = []
    density_errors: list[tuple[float, float]] = []
    for seed in range(repeats):
        ours_trace = trace(ops.ours, 99, seed=seed).estimate
        theirs_trace = he.trace(ops.theirs, num_matvecs=99, seed=seed).estimate
        trace_errors.append(
            (
                abs(ours_trace - exact_trace) / exact_trace,
                abs(theirs_trace - exact_trace) / exact_trace,
            )
        )
        ours_density = density(ops.ours, 20, 4, seed=seed).density(grid, sigma)
        result = he.spectral_density(ops.theirs, num_runs=4, lanczos_steps=20, seed=seed)
        nodes = result.raw_eigenvalues.reshape(-1)
        kept = torch.isfinite(nodes)
        theirs_density = smoothed(
            nodes[kept], result.raw_weights.reshape(-1)[kept] / 4, grid, sigma
        )
        density_errors.append(
            (
                float((ours_density - exact_density).abs().sum()) * step,
                float((theirs_density - exact_density).abs().sum()) * step,
            )
        )
    estimates = []
    for label, errors in [
        ("trace, Hutch++ 99 products: rel. error", trace_errors),
        ("density, SLQ 4 x 20 products: L1 distance", density_errors),
    ]:
        ours, theirs = (statistics.median(column) for column in zip(*errors, strict=True))
        estimates.append({"estimate": label, "ours": ours, "theirs": theirs})
    tables["estimates"] = (ESTIMATE_COLUMNS, estimates)
    return tables, notes


def seconds_per_product(run: Callable[[], object], products: int) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / products


def speed(repeats: int) -> list[dict[str, Any]]:
    """Seconds per product of both libraries inside Lanczos, interleaved, and their ratio."""
    rows = []
    for name, build in [
        ("MLP, 2,058 params, float64", mlp_problem),
        ("SimpleCNN width 0.5, batch 128, float32", cnn_problem),
    ]:
        model, x, y = build()
        ops = Operators(model, x, y)
        ours_times, theirs_times = [], []
        for seed in range(repeats):
            ours_times.append(
                seconds_per_product(
                    partial(top_eigenvalues, ops.ours, 1, num_iters=20, tol=None, seed=seed), 20
                )
            )
            theirs_times.append(
                seconds_per_product(
                    partial(he.lanczos, ops.theirs, k=1, max_iter=20, which="LA", seed=seed), 20
                )
            )
        ours, theirs = statistics.median(ours_times), statistics.median(theirs_times)
        rows.append(
            {"model": name, "ours_seconds": ours, "theirs_seconds": theirs, "ratio": ours / theirs}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "eigenthings.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    report = new_report(parser, args, threads=1)
    tables, notes = accuracy(args.repeats)
    tables["speed"] = (SPEED_COLUMNS, speed(args.repeats))
    notes["setting"] = (
        f"hessian-eigenthings {he.__version__}; errors are medians over {args.repeats} seeds, "
        "the difference of the Ritz values the largest over them; seconds per product are "
        f"medians over {args.repeats} repeats of 20 Lanczos steps, the libraries interleaved."
    )
    publish(report, args.out, start, tables, {**FORMATS, **SPEED_FORMATS}, notes)


if __name__ == "__main__":
    main()
