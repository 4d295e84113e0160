"""eigensam vs PyHessian, side by side: top eigenvalue, trace and spectral density of one Hessian.

Same model, same data, same mode, same HVP backend for both libraries:

- model: the paper's SimpleCNN (``--width``, default 0.5 to keep the run under ~5 minutes on two
  CPU cores; ``--width 1`` is the paper's size) on Fashion-MNIST, trained from seed 0 for
  ``--train-steps`` SGD steps (lr 0.05, momentum 0.9, batch 128) so the Hessian is not that of
  the initialization (random images stand in when Fashion-MNIST is not installed);
- data: one held-out batch of ``--batch-size`` training images;
- mode: eval (PyHessian forces it); backend: double backward (PyHessian's only one, eigensam's
  ``"autograd"``); float32.

Reference: eigensam Lanczos run to relative residual 1e-6 (top eigenvalue and eigenvector) and a
long Hutch++ run (trace, with its standard error). Errors and times are medians over
``--repeats`` seeds (PyHessian draws from the global RNG, seeded per repeat); the libraries are
interleaved so machine noise hits them alike; compare ratios within one run. PyHessian 0.1 calls
``torch.eig``, removed in torch 2.x: for its density only, this script supplies ``torch.eig``
from ``torch.linalg.eigh`` (the Lanczos tridiagonal is symmetric). Run:

    pip install pyhessian==0.1 --no-deps   # the `bench` extra
    python benchmarks/bench_pyhessian.py [--width 0.5] [--batch-size 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from common import load_images
from torch import Tensor, nn

from eigensam.hessian import DatasetHessian, abs_cosine, density, top_eigenvalues, trace
from eigensam.lab.workloads.models import build_model

Batch = tuple[Tensor, Tensor]
# PyHessian stops when (change of the estimate) / (estimate + 1e-6) < tol; the trace's ratio is
# negative when the running mean is, so tol=0 can still stop early: -inf runs the full budget.
NEVER = float("-inf")


# -------------------------------------------------------------------------------- setup


def trained_model(args: argparse.Namespace) -> tuple[nn.Module, Batch, str, float]:
    """SimpleCNN after ``train_steps`` SGD steps; the first batch of the subset is held out for
    the Hessian. Returns the model (train mode), the batch, the data name and the final loss."""
    n = args.batch_size * (1 + min(args.train_steps, 40))
    images, labels, name = load_images(n)
    batch = (images[: args.batch_size], labels[: args.batch_size])
    train_x, train_y = images[args.batch_size :], labels[args.batch_size :]
    torch.manual_seed(0)
    model = build_model("simplecnn", num_classes=10, in_channels=1, image_size=28, width=args.width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    loss = torch.tensor(float("nan"))
    for _ in range(args.train_steps):
        index = torch.randint(0, len(train_y), (128,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, batch, name, loss.item()


def pyhessian_modules() -> tuple[Any, Any] | None:
    try:
        package = importlib.import_module("pyhessian")
        return package, importlib.import_module("pyhessian.hessian")
    except ImportError:
        return None


@contextlib.contextmanager
def counted_pyhessian_hvps(module: Any) -> Iterator[list[int]]:
    """Count PyHessian's single-batch Hessian-vector products (its ``hessian_vector_product``)."""
    original = module.hessian_vector_product
    count = [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(*args, **kwargs)

    module.hessian_vector_product = counting
    try:
        yield count
    finally:
        module.hessian_vector_product = original


@contextlib.contextmanager
def torch_eig_for_pyhessian() -> Iterator[None]:
    """``torch.eig(T, eigenvectors=True)`` (removed in torch 2.x) for symmetric ``T``: values as
    the (real, imaginary) columns the old API returned, and the eigenvectors."""

    def eig(matrix: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor]:
        values, vectors = torch.linalg.eigh(matrix)
        return torch.stack([values, torch.zeros_like(values)], dim=1), vectors

    original = getattr(torch, "eig", None)  # in torch 2.x a stub that raises
    torch.eig = eig  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if original is None:
            del torch.eig  # type: ignore[attr-defined]
        else:
            torch.eig = original  # type: ignore[attr-defined]


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def g3(x: float) -> str:
    return f"{x:.3g}"


# -------------------------------------------------------------------------------- runs


class Bench:
    def __init__(self, model: nn.Module, batch: Batch, pyhessian: tuple[Any, Any]):
        self.model = model
        self.batch = batch
        self.package, self.module = pyhessian
        self.criterion = nn.CrossEntropyLoss()

    def pyhessian(self, seed: int) -> Any:
        torch.manual_seed(seed)
        self.model.zero_grad(set_to_none=True)
        return self.package.hessian(self.model, self.criterion, data=self.batch, cuda=False)

    def cleanup(self) -> None:
        """Undo what PyHessian leaves behind (graph-holding .grad, eval mode) for the next run."""
        self.model.zero_grad(set_to_none=True)
        self.model.train()

    def operator(self, check: bool = False) -> DatasetHessian:
        return DatasetHessian(self.model, [self.batch], self.criterion, mode="eval", check=check)

    def pyhessian_top(self, max_iter: int, tol: float, seed: int) -> tuple[float, Tensor, int]:
        with counted_pyhessian_hvps(self.module) as count:
            values, vectors = self.pyhessian(seed).eigenvalues(maxIter=max_iter, tol=tol)
        self.cleanup()
        return values[0], flat(vectors[0]), count[0]

    def eigensam_top(
        self, method: str, num_iters: int, tol: float | None, seed: int, check: bool
    ) -> tuple[float, Tensor, int]:
        with self.operator(check) as op:
            (result,) = top_eigenvalues(op, method=method, num_iters=num_iters, tol=tol, seed=seed)
        return result.eigenvalue, result.eigenvector, op.num_matvecs + op.num_check_matvecs

    def pyhessian_trace(self, max_iter: int, tol: float, seed: int) -> tuple[float, float, int]:
        samples = self.pyhessian(seed).trace(maxIter=max_iter, tol=tol)
        self.cleanup()
        n = len(samples)
        se = statistics.stdev(samples) / math.sqrt(n) if n > 1 else float("nan")
        return statistics.fmean(samples), se, n

    def eigensam_trace(self, method: str, budget: int, seed: int) -> tuple[float, float, int]:
        with self.operator() as op:
            estimate = trace(op, budget, method=method, seed=seed)
        return estimate.estimate, estimate.std_error, op.num_matvecs

    def pyhessian_density(self, steps: int, seed: int) -> tuple[float, int]:
        with counted_pyhessian_hvps(self.module) as count, torch_eig_for_pyhessian():
            nodes, _ = self.pyhessian(seed).density(iter=steps, n_v=1)
        self.cleanup()
        return max(nodes[0]), count[0]

    def eigensam_density(self, steps: int, seed: int) -> tuple[float, int]:
        with self.operator() as op:
            result = density(op, num_iters=steps, seed=seed)
        return float(result.nodes[0].max()), op.num_matvecs


def summarize(runs: list[tuple[float, Tensor | None, int, float]], reference: Any) -> list[str]:
    """Median HVPs, median [max] relative error, median |cos| and median time of repeated runs."""
    errors = [abs(value - reference.eigenvalue) / abs(reference.eigenvalue) for value, *_ in runs]
    cosines = [abs_cosine(v, reference.eigenvector) for _, v, _, _ in runs if v is not None]
    hvps = statistics.median(r[2] for r in runs)
    return [
        f"{hvps:g}",
        f"{statistics.median(errors):.2e} [{max(errors):.2e}]",
        f"{statistics.median(cosines):.4f}",
        f"{statistics.median(r[3] for r in runs):.2f}",
    ]


def top_eigenvalue_section(bench: Bench, args: argparse.Namespace) -> tuple[Any, list[str]]:
    with bench.operator() as op:
        reference, seconds = timed(
            lambda: top_eigenvalues(op, num_iters=args.reference_iters, tol=1e-6, seed=12345)[0]
        )
    lines = [
        f"Reference λ₁ = {reference.eigenvalue:.6g} (eigensam Lanczos, relative residual "
        f"{reference.residual / abs(reference.eigenvalue):.1e}, converged={reference.converged}, "
        f"{reference.num_matvecs} HVPs, {seconds:.1f} s)",
        "",
    ]
    configs: list[tuple[str, str, str, Callable[[int], tuple[float, Tensor, int]]]] = [
        (
            "PyHessian",
            "power iteration",
            "default (maxIter=100, tol=1e-3)",
            lambda s: bench.pyhessian_top(100, 1e-3, s),
        ),
        (
            "eigensam",
            "Lanczos",
            "default (num_iters=100, tol=1e-3, +1 check)",
            lambda s: bench.eigensam_top("lanczos", 100, 1e-3, s, check=True),
        ),
    ]
    for budget in args.budgets:
        configs += [
            (
                "PyHessian",
                "power iteration",
                f"budget {budget}",
                lambda s, b=budget: bench.pyhessian_top(b, NEVER, s),
            ),
            (
                "eigensam",
                "power iteration",
                f"budget {budget}",
                lambda s, b=budget: bench.eigensam_top("power", b, None, s, check=False),
            ),
            (
                "eigensam",
                "Lanczos",
                f"budget {budget}",
                lambda s, b=budget: bench.eigensam_top("lanczos", b, None, s, check=False),
            ),
        ]
    runs: dict[int, list[tuple[float, Tensor, int, float]]] = {i: [] for i in range(len(configs))}
    for repeat in range(args.repeats):
        order = range(len(configs)) if repeat % 2 == 0 else reversed(range(len(configs)))
        for i in order:
            (value, vector, hvps), seconds = timed(lambda i=i, r=repeat: configs[i][3](1000 + r))
            runs[i].append((value, vector, hvps, seconds))
    rows = [
        [lib, method, setting, *summarize(runs[i], reference)]
        for i, (lib, method, setting, _) in enumerate(configs)
    ]
    headers = ["library", "method", "setting", "HVPs", "rel. error λ₁ median [max]", "|cos(v, v₁)|"]
    lines.append(table([*headers, "time s"], rows))
    errors = {i: statistics.median(abs(r[0] - reference.eigenvalue) for r in runs[i]) for i in runs}
    times = {i: statistics.median(r[3] for r in runs[i]) for i in runs}
    lines.append("")
    for k, budget in enumerate(args.budgets):
        pyh, lanczos_row = 2 + 3 * k, 4 + 3 * k
        lines.append(
            f"Budget {budget}: PyHessian error / eigensam Lanczos error = "
            f"{errors[pyh] / max(errors[lanczos_row], 1e-300):.3g}"
        )
    lines.append(
        f"Defaults: eigensam error {errors[1] / abs(reference.eigenvalue):.2e} in {times[1]:.2f} s "
        f"vs PyHessian {errors[0] / abs(reference.eigenvalue):.2e} in {times[0]:.2f} s "
        f"(time ratio eigensam/PyHessian {times[1] / times[0]:.2f})"
    )
    defaults = [value for value, *_ in runs[0]]
    lines.append(
        f"PyHessian default λ₁ over {args.repeats} seeds: "
        + ", ".join(f"{v:.5g}" for v in defaults)
    )
    return reference, lines


def trace_section(bench: Bench, args: argparse.Namespace) -> list[str]:
    with bench.operator() as op:
        reference, seconds = timed(lambda: trace(op, args.reference_trace, seed=54321))
    lines = [
        f"Reference tr(H) = {reference.estimate:.5g} ± {reference.std_error:.2g} (eigensam "
        f"Hutch++, {reference.num_matvecs} HVPs, {seconds:.1f} s)",
        "",
    ]
    budget = args.trace_budget
    configs: list[tuple[str, str, Callable[[int], tuple[float, float, int]]]] = [
        ("PyHessian", "Hutchinson, default (maxIter=100, tol=1e-3)",
         lambda s: bench.pyhessian_trace(100, 1e-3, s)),
        ("PyHessian", f"Hutchinson, budget {budget}",
         lambda s: bench.pyhessian_trace(budget, NEVER, s)),
        ("eigensam", f"Hutchinson, budget {budget}",
         lambda s: bench.eigensam_trace("hutchinson", budget, s)),
        ("eigensam", f"Hutch++, budget {budget}",
         lambda s: bench.eigensam_trace("hutchpp", budget, s)),
    ]  # fmt: skip
    runs: dict[int, list[tuple[float, float, int, float]]] = {i: [] for i in range(len(configs))}
    for repeat in range(args.repeats):
        order = range(len(configs)) if repeat % 2 == 0 else reversed(range(len(configs)))
        for i in order:
            (value, se, hvps), seconds = timed(lambda i=i, r=repeat: configs[i][2](2000 + r))
            runs[i].append((value, se, hvps, seconds))
    rows = []
    for i, (lib, setting, _) in enumerate(configs):
        errors = [
            abs(value - reference.estimate) / abs(reference.estimate) for value, *_ in runs[i]
        ]
        rows.append(
            [
                lib,
                setting,
                "/".join(str(r[2]) for r in runs[i]),
                ", ".join(f"{r[0]:.4g}" for r in runs[i]),
                f"{math.sqrt(statistics.fmean(e * e for e in errors)):.2e}",
                f"{statistics.fmean(r[1] / abs(reference.estimate) for r in runs[i]):.2e}",
                f"{statistics.median(r[3] for r in runs[i]):.2f}",
            ]
        )
    headers = ["library", "estimator", "HVPs", "estimates", "RMS rel. error", "rel. SE (mean)"]
    lines.append(table([*headers, "time s"], rows))
    lines.append(
        "\nPyHessian's and eigensam's Hutchinson draw the same Rademacher probes from the same "
        "seed (one flat randint stream), so their estimates coincide: compare their times."
    )
    return lines


def density_section(bench: Bench, args: argparse.Namespace, reference: Any) -> list[str]:
    runs: dict[str, list[tuple[float, int, float]]] = {"PyHessian": [], "eigensam": []}
    functions = {"PyHessian": bench.pyhessian_density, "eigensam": bench.eigensam_density}
    for repeat in range(args.repeats):
        names = list(runs) if repeat % 2 == 0 else list(reversed(runs))
        for name in names:
            (top, hvps), seconds = timed(
                lambda n=name, r=repeat: functions[n](args.density_steps, 3000 + r)
            )
            runs[name].append((top, hvps, seconds))
    rows = []
    for name, results in runs.items():
        errors = [
            abs(top - reference.eigenvalue) / abs(reference.eigenvalue) for top, *_ in results
        ]
        rows.append(
            [
                name,
                args.density_steps,
                results[0][1],
                f"{statistics.median(r[2] for r in results):.2f}",
                f"{statistics.median(errors):.2e}",
            ]
        )
    headers = ["library", "Lanczos steps", "HVPs", "time s (median)", "top Ritz value rel. error"]
    return [table(headers, rows)]


def side_effects_section(bench: Bench) -> list[str]:
    """What each library leaves behind after one top-eigenvalue call on a model in train mode
    whose ``.grad`` holds the gradient of a training step."""
    rows = []
    x, y = bench.batch
    for name in ("PyHessian", "eigensam"):
        bench.model.train()
        bench.model.zero_grad(set_to_none=True)
        bench.criterion(bench.model(x[:8]), y[:8]).backward()
        grads = [p.grad for p in bench.model.parameters()]
        saved = [g.clone() for g in grads]
        torch.manual_seed(7)
        rng = torch.get_rng_state()
        if name == "PyHessian":
            bench.package.hessian(
                bench.model, bench.criterion, data=bench.batch, cuda=False
            ).eigenvalues(maxIter=5, tol=NEVER)
        else:
            with bench.operator(check=True) as op:
                top_eigenvalues(op, num_iters=5)
        after = [p.grad for p in bench.model.parameters()]
        if all(a is g and torch.equal(a, s) for a, g, s in zip(after, grads, saved, strict=True)):
            grad_state = "unchanged"
        else:
            grad_state = "None (lost)" if all(a is None for a in after) else "changed"
        rows.append(
            [
                name,
                "train" if bench.model.training else "eval",
                grad_state,
                "unchanged" if torch.equal(torch.get_rng_state(), rng) else "advanced",
            ]
        )
    bench.cleanup()
    headers = ["library", "mode after (was train)", ".grad after (held a gradient)"]
    return [table([*headers, "global RNG"], rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--reference-iters", type=int, default=300)
    parser.add_argument("--trace-budget", type=int, default=60)
    parser.add_argument("--reference-trace", type=int, default=600)
    parser.add_argument("--density-steps", type=int, default=40)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    pyhessian = pyhessian_modules()
    if pyhessian is None:
        print(
            "PyHessian is not installed: `pip install pyhessian==0.1 --no-deps` (the `bench` "
            "extra) to run this comparison. Skipped."
        )
        return
    start = time.perf_counter()
    model, batch, data_name, loss = trained_model(args)
    dim = sum(p.numel() for p in model.parameters())
    print(
        f"SimpleCNN width {args.width:g} ({dim} parameters), trained {args.train_steps} SGD "
        f"steps on {data_name} (last batch loss {loss:.3f}); Hessian of one batch of "
        f"{args.batch_size} in eval mode, double-backward HVPs, float32, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats.\n"
    )
    bench = Bench(model, batch, pyhessian)
    print("## Top eigenvalue\n")
    reference, lines = top_eigenvalue_section(bench, args)
    print("\n".join(lines), flush=True)
    print("\n## Trace\n")
    print("\n".join(trace_section(bench, args)), flush=True)
    print("\n## Spectral density (SLQ, one probe)\n")
    print("\n".join(density_section(bench, args, reference)), flush=True)
    print("\n## Side effects (one call on a model in train mode)\n")
    print("\n".join(side_effects_section(bench)))
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    sys.exit(main())
