"""How good is Eigen-SAM's tracked top eigenvector during real training? Power vs Lanczos at q.

An Eigen-SAM run (SimpleCNN on a Fashion-MNIST subset, SGD base, ρ=0.05, α=0.2, the paper's
power-iteration tracker with ``q = --iters`` warm-started products every ``--interval`` steps)
is trained for ``--steps`` steps. At every refresh, on the same batch and weights, we also run:

- a shadow Lanczos tracker with ``--lanczos-iters`` products (default: the same ``q``),
  warm-started from its own previous estimate (same first start vector as the power tracker; it
  does not steer training, so both estimators see the same states);
- power iteration and Lanczos with ``q`` products from a fresh random vector (cold start);
- a converged reference ``v₁`` (Lanczos to relative residual ``--reference-tol``).

Printed: ``|cos(v̂, v₁)|`` per refresh and its mean per estimator. The paper refreshes every 100
steps; ``--interval 20`` (default) gives ≥ 10 refreshes in a CPU-sized run, so the warm start is
fresher than in the paper's setting. Run:

    python benchmarks/bench_tracker.py [--steps 300] [--interval 20] [--iters 5] [--width 0.5]

Does Lanczos with fewer products match the paper's power iteration (the README's cost section)?

    python benchmarks/bench_tracker.py --interval 100 --steps 800 --iters 5 --lanczos-iters 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from common import load_images
from torch import Tensor, nn

from eigensam import EigenSAM
from eigensam.hessian import (
    EigenTracker,
    HessianOperator,
    abs_cosine,
    lanczos,
    power_iteration,
    top_eigenvalues,
)
from eigensam.hessian.eigen import random_unit_vector
from eigensam.lab.workloads.models import build_model

ESTIMATORS = ("power, warm", "lanczos, warm", "power, cold", "lanczos, cold")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


class Comparison:
    """Wraps the optimizer's tracker update: after each refresh, measures every estimator
    against a converged ``v₁`` on the same closure (batch) and weights."""

    def __init__(self, optimizer: EigenSAM, args: argparse.Namespace):
        self.optimizer = optimizer
        self.args = args
        self.shadow = EigenTracker(
            args.interval, args.lanczos_iters, method="lanczos", mode="train", seed=args.seed
        )
        self.cold = torch.Generator().manual_seed(args.seed + 1)
        self.rows: list[dict[str, Any]] = []
        self.original = optimizer.tracker.update
        optimizer.tracker.update = self.update  # type: ignore[method-assign]

    def update(
        self, closure: Callable[[], Tensor], params: Sequence[Tensor], model: Any = None, **kw: Any
    ) -> Any:
        result = self.original(closure, params, model, **kw)
        start = time.perf_counter()
        shadow = self.shadow.update(closure, params, model)
        q = self.args.iters
        with HessianOperator(closure, params, backend="autograd", model=model, mode="train") as op:
            v0 = random_unit_vector(op.dim, generator=self.cold, dtype=op.dtype, device=op.device)
            power_cold = power_iteration(op.matvec, v0, q)
            lanczos_cold = lanczos(op.matvec, v0, q)[0]
            (reference,) = top_eigenvalues(
                op, num_iters=self.args.reference_iters, tol=self.args.reference_tol, seed=0
            )
        v1 = reference.eigenvector
        estimates = [result, shadow, power_cold, lanczos_cold]
        self.rows.append(
            {
                "step": self.optimizer.sam_steps,
                "lambda": reference.eigenvalue,
                "relative_residual": reference.residual / abs(reference.eigenvalue),
                "reference_hvps": reference.num_matvecs,
                "cos": [abs_cosine(e.eigenvector, v1) for e in estimates],
                "eigenvalues": [e.eigenvalue for e in estimates],
                "seconds": time.perf_counter() - start,
            }
        )
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--interval", type=int, default=20)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--lanczos-iters", type=int, default=None, help="default: --iters")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--subset", type=int, default=10240)
    parser.add_argument("--reference-iters", type=int, default=150)
    parser.add_argument("--reference-tol", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    args.lanczos_iters = args.lanczos_iters or args.iters
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    images, labels, data_name = load_images(args.subset)
    torch.manual_seed(args.seed)
    model = build_model("simplecnn", num_classes=10, in_channels=1, image_size=28, width=args.width)
    optimizer = EigenSAM(
        model,
        torch.optim.SGD,
        rho=0.05,
        alpha=0.2,
        eig_interval=args.interval,
        eig_iters=args.iters,
        seed=args.seed,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
    )
    comparison = Comparison(optimizer, args)
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    for _ in range(args.steps):
        index = torch.randint(0, len(labels), (args.batch_size,), generator=g)
        x, y = images[index], labels[index]

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(float(optimizer.step(closure).detach()))
    dim = sum(p.numel() for p in model.parameters())
    print(
        f"Eigen-SAM (power tracker, q={args.iters}, interval {args.interval}, train-mode HVPs) on "
        f"SimpleCNN width {args.width:g} ({dim} parameters), {data_name} subset of {args.subset}, "
        f"batch {args.batch_size}, {args.steps} steps (loss {statistics.fmean(losses[:20]):.3f} -> "
        f"{statistics.fmean(losses[-20:]):.3f}), {torch.get_num_threads()} threads. Reference: "
        f"Lanczos to relative residual {args.reference_tol:g}.\n"
    )
    rows = comparison.rows
    per_refresh = [
        [
            r["step"],
            f"{r['lambda']:.4g}",
            f"{r['relative_residual']:.0e}",
            *(f"{c:.3f}" for c in r["cos"]),
            f"{r['eigenvalues'][0]:.4g}",
            f"{r['eigenvalues'][1]:.4g}",
        ]
        for r in rows
    ]
    headers = ["step", "λ₁", "ref. rel. res.", *(f"|cos| {e}" for e in ESTIMATORS)]
    print(table([*headers, "λ̂ power", "λ̂ lanczos"], per_refresh))
    print()
    summary = []
    for i, name in enumerate(ESTIMATORS):
        values = [r["cos"][i] for r in rows]
        later = values[1:] or values
        summary.append(
            [
                name,
                args.lanczos_iters if name == "lanczos, warm" else args.iters,
                f"{statistics.fmean(values):.3f}",
                f"{statistics.fmean(later):.3f}",
                f"{min(later):.3f}",
            ]
        )
    print(
        table(
            ["estimator", "HVPs", "mean |cos|", "mean |cos| after 1st refresh", "min after 1st"],
            summary,
        )
    )
    print(
        f"\n{len(rows)} refreshes; measurement {sum(r['seconds'] for r in rows):.0f} s, "
        f"total {time.perf_counter() - started:.0f} s."
    )


if __name__ == "__main__":
    main()
