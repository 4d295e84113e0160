"""Step time and peak memory of SGD, SAM, Eigen-SAM and X-SAM, and HVP cost/accuracy per backend.

``eigen-sam`` and ``x-sam`` use their defaults; ``eigen-sam/<hvp backend>`` and
``eigen-sam/lanczos`` change one option.

Model: the paper's 6-layer SimpleCNN on Fashion-MNIST-shaped batches (real Fashion-MNIST when it
is installed, else random images). Prints Markdown tables. Run:

    python benchmarks/bench_optimizers.py [--batch-size 128] [--rounds 3] [--steps 100]

Step times are medians over rounds of ``--steps`` consecutive steps (one Eigen-SAM interval, so
its eigenvector refresh is averaged in); methods are interleaved round by round so machine noise
hits them alike, and ratios are taken within this one run. Peak memory is the growth of the peak
resident set size (Linux VmHWM, reset after setup) over the size after setup, each optimizer in its
own subprocess, over 20 steps with eig_interval 10.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from common import load_images
from torch import nn

from eigensam import SAM, XSAM, EigenSAM
from eigensam.hessian.eigen import power_iteration
from eigensam.hessian.hvp import BACKENDS, HessianOperator
from eigensam.lab.models import build_model

METHODS = (
    "sgd",
    "sam",
    "eigen-sam",
    "eigen-sam/fd-forward",
    "eigen-sam/fd-central",
    "eigen-sam/lanczos",
    "x-sam",
)


def batches(batch_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y, _ = load_images(batch_size * count)
    return list(zip(x.split(batch_size), y.split(batch_size), strict=True))


def make_optimizer(method: str, model: nn.Module, eig_interval: int) -> torch.optim.Optimizer:
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), **sgd)
    if method == "sam":
        return SAM(model, torch.optim.SGD, rho=0.05, **sgd)
    name, _, variant = method.partition("/")
    options = (
        {"eig_method": "lanczos"} if variant == "lanczos" else {"hvp": variant} if variant else {}
    )
    cls = EigenSAM if name == "eigen-sam" else XSAM
    return cls(
        model, torch.optim.SGD, rho=0.05, eig_interval=eig_interval, eig_iters=5, **options, **sgd
    )


def run_steps(model, opt, data) -> float:
    start = time.perf_counter()
    for x, y in data:

        def closure(x=x, y=y):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if isinstance(opt, SAM):
            opt.step(closure)
        else:
            opt.zero_grad()
            closure()
            opt.step()
    return (time.perf_counter() - start) / len(data)


def time_steps(args) -> dict[str, float]:
    data = batches(args.batch_size, args.steps)
    runs = {}
    for method in METHODS:
        torch.manual_seed(0)
        model = build_model("simplecnn", num_classes=10, in_channels=1, image_size=28)
        runs[method] = (model, make_optimizer(method, model, args.steps))
        run_steps(*runs[method], data[:3])  # warm-up; Eigen-SAM's next refresh is in the rounds
    times = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for method in METHODS:
            opt = runs[method][1]
            if isinstance(opt, EigenSAM | XSAM):
                opt.sam_steps = 0  # the first step of each round refreshes the eigenvector
            times[method].append(run_steps(*runs[method], data))
    return {m: statistics.median(t) for m, t in times.items()}


def hvp_table(args) -> list[dict[str, float | str]]:
    torch.manual_seed(0)
    model = build_model("simplecnn", num_classes=10, in_channels=1, image_size=28)
    ((x, y),) = batches(args.batch_size, 1)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    params = list(model.parameters())
    vectors = [torch.randn(sum(p.numel() for p in params)) for _ in range(args.hvps)]
    vectors = [v / v.norm() for v in vectors]
    with HessianOperator(closure, params, backend="autograd", model=model) as op:
        exact = [op.matvec(v) for v in vectors]
        top = power_iteration(op.matvec, vectors[0], 100).eigenvector
        exact_top = op.matvec(top)
    start = time.perf_counter()
    for _ in range(args.hvps):
        model.zero_grad()
        closure()
    grad_time = (time.perf_counter() - start) / args.hvps
    rows = []
    for backend in BACKENDS:
        with HessianOperator(closure, params, backend=backend, model=model) as op:
            op.matvec(vectors[0])  # builds the graph (autograd) / base gradient (fd-forward)
            start = time.perf_counter()
            products = [op.matvec(v) for v in vectors]
            elapsed = (time.perf_counter() - start) / args.hvps
            top_cosine = float(nn.functional.cosine_similarity(op.matvec(top), exact_top, dim=0))
        cosine = min(
            float(nn.functional.cosine_similarity(p, e, dim=0))
            for p, e in zip(products, exact, strict=True)
        )
        rows.append(
            {
                "backend": backend,
                "hvp_over_grad": elapsed / grad_time,
                "min_cosine": cosine,
                "top_cosine": top_cosine,
            }
        )
    return rows


def peak_memory(method: str, args) -> float:
    """Peak RSS growth (MiB) of ``--steps`` steps of ``method``, measured in a fresh process."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-child",
            method,
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth_mib"]


def rss_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def memory_child(method: str, args) -> None:
    data = batches(args.batch_size, min(args.steps, 20))
    torch.manual_seed(0)
    model = build_model("simplecnn", num_classes=10, in_channels=1, image_size=28)
    opt = make_optimizer(method, model, eig_interval=10)
    warm = nn.Conv2d(1, 1, 3)  # load kernels and start autograd threads before the baseline
    warm(data[0][0][:2]).sum().backward()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak (VmHWM) to the current resident size
    base = rss_kib("VmRSS")
    run_steps(model, opt, data)
    print(json.dumps({"peak_growth_mib": (rss_kib("VmHWM") - base) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="steps per round (= eig_interval)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hvps", type=int, default=10)
    parser.add_argument("--memory-child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    times = time_steps(args)
    memory = {m: peak_memory(m, args) for m in METHODS}
    print("\n| method | step time (ms) | / SGD | / SAM | peak memory growth (MiB) | / SGD |")
    print("|---|---|---|---|---|---|")
    for m in METHODS:
        print(
            f"| {m} | {times[m] * 1e3:.2f} | {times[m] / times['sgd']:.3f} | "
            f"{times[m] / times['sam']:.3f} | {memory[m]:.1f} | "
            f"{memory[m] / max(memory['sgd'], 1e-9):.2f} |"
        )
    print(
        "\n| HVP backend | HVP time / gradient time | min cosine to exact HVP, random v "
        "| cosine along top eigenvector |"
    )
    print("|---|---|---|---|")
    rows = hvp_table(args)
    for row in rows:
        print(
            f"| {row['backend']} | {row['hvp_over_grad']:.2f} | {row['min_cosine']:.5f} "
            f"| {row['top_cosine']:.5f} |"
        )
    fastest = min((r for r in rows if r["min_cosine"] >= 0.99), key=lambda r: r["hvp_over_grad"])
    print(f"\nfastest backend with cosine >= 0.99: {fastest['backend']}")


if __name__ == "__main__":
    main()
