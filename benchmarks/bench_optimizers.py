"""What Eigen-SAM and X-SAM cost next to SGD and SAM: step time, peak memory, HVP backends.

Three tables, printed as Markdown and written to ``benchmarks/results/cost-<device>.json`` with
the machine description (CPU model, threads, torch version, load average), and rendered by
``tables.py`` into the ``.md`` beside it, whose sections the docs include:

1. **Step time** at ``p = --interval``, ``q = 5`` (the default rule: its own ``p``, ``q``): per
   round, every method runs one refresh step and ``--plain-steps`` steps without a refresh;
   the per-step time averaged over the interval
   is ``(t_refresh + (p − 1)·t_plain) / p``. Plain steps run round robin (one step of each
   method in turn) and ratios are medians of per-cycle ratios, so load from other jobs on a
   shared machine hits all methods alike. ``time outside the closure`` is the share of a plain
   step spent in the optimizer (perturbation, restore, update). Models: the paper's ReLU
   SimpleCNN and a smooth variant (GeLU, average pooling) where ``hvp="fd-forward"`` is
   accurate; on CUDA also ResNet-18 with BatchNorm at CIFAR size. Each model's table runs in a
   fresh process, on CPU twice: with glibc's default allocator (freed blocks go back to the
   system and are faulted in again) and with freed memory kept
   (:func:`eigensam.allocator.keep_freed_memory`, what the ``eigensam`` command does).
2. **Peak memory** growth over 2 steps with a refresh each, one fresh process per optimizer, on
   SimpleCNN, SimpleCNN with BatchNorm after every convolution (``bn-cnn``) and ResNet-18 (half
   width on CPU) at the batch sizes of ``--memory-batches``. On CPU: Linux VmHWM after a reset,
   minus the resident size after setup, with glibc's mmap threshold fixed at 128 KiB
   (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors go back to the system and the peak is that
   of live memory; with glibc's adaptive default the freed heap stays resident and the peak
   depends on allocation order (SGD once measured above SAM). On CUDA: ``max_memory_allocated``.
3. **HVP backends**: time per product over gradient time (in this process, freed memory kept),
   peak memory growth (fresh process) and accuracy against the exact product, for double
   backward with the graph kept across products, the same part by part (``SplitClosure``),
   forward-over-reverse (``torch.func``, measured here only), and finite differences.

Method names: ``eigen-sam`` and ``x-sam`` run the paper's rule (5 warm power products every
``--interval`` steps) the way the README documents the step, ``opt.step(closure, batch=(x, y))``
(eval-mode products, ``hvp="auto"``, ``hessian_parts="auto"``: exact products summed over 4
micro-batches); ``/default`` is the library's default rule (warm power iteration, 2 products every
40 steps, its own interval in the average below); ``/whole`` passes a
plain closure instead (whole-batch products); ``/train`` is ``hessian_mode="train"`` with a plain
closure (the defaults before 0.6: whole-batch products, the refresh's gradient reused as the first
pass); ``/lanczos4`` is ``eig_method="lanczos", eig_iters=4``; ``/fd-forward`` uses
finite-difference products.

Run (``make bench`` runs the default, about 5 minutes on a 2-core CPU):

    python benchmarks/bench_optimizers.py [--device cpu|cuda] [--rounds 5] [--interval 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import load_images
from tables import HVP_COLUMNS, MEMORY_COLUMNS, TIME_COLUMNS, machine, markdown, save
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from eigensam import SAM, XSAM, EigenSAM
from eigensam.allocator import USER_SETTINGS, keep_freed_memory
from eigensam.hessian.closures import split_closure
from eigensam.hessian.eigen import power_iteration
from eigensam.hessian.hvp import HessianOperator, flatten, unflatten
from eigensam.lab.workloads.models import build_model

PARTS = 4  # micro-batches of the memory-lean exact products in the HVP table
CNN_TIME = (
    "sgd",
    "sam",
    "eigen-sam",
    "eigen-sam/default",
    "eigen-sam/whole",
    "eigen-sam/lanczos4",
    "x-sam",
)
TIME_METHODS = {
    "simplecnn": (*CNN_TIME, "eigen-sam/train"),
    "gelu-cnn": ("sgd", "sam", "eigen-sam", "eigen-sam/fd-forward"),
    "resnet18": (*CNN_TIME, "eigen-sam/train"),  # CUDA only
}
# The memory table: every model at every batch size of --memory-batches.
MEMORY_METHODS = ("sgd", "sam", "eigen-sam", "eigen-sam/whole", "eigen-sam/train", "x-sam")
HVP_BACKENDS = (
    "autograd",
    f"autograd/split{PARTS}",
    "forward-over-reverse",
    "fd-central",
    "fd-forward",
)
LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # see the module docstring
# Step time is measured with glibc's default allocator and with freed memory kept (CPU only).
ALLOCATORS = {"cpu": ("default", "kept"), "cuda": ("default",)}


# -- models, data, optimizers ---------------------------------------------------------------


def make_model(name: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":  # half width on CPU, the paper's full width on CUDA
        width = 1.0 if device == "cuda" else 0.5
        model = build_model("resnet18", num_classes=10, in_channels=3, image_size=32, width=width)
        return model.to(device)
    model = build_model("simplecnn", num_classes=10, in_channels=1, image_size=28)
    if name == "bn-cnn":  # SimpleCNN with a BatchNorm layer after every convolution
        features = model.features
        for i, layer in enumerate(features):
            if isinstance(layer, nn.Conv2d):
                features[i] = nn.Sequential(layer, nn.BatchNorm2d(layer.out_channels))
    if name == "gelu-cnn":  # smooth: no ReLU or max-pool kinks
        for parent in model.modules():
            for child_name, child in parent.named_children():
                if isinstance(child, nn.ReLU):
                    setattr(parent, child_name, nn.GELU())
                elif isinstance(child, nn.MaxPool2d):
                    setattr(parent, child_name, nn.AvgPool2d(2))
    return model.to(device)


def make_batches(model: str, batch_size: int, count: int, device: str) -> list[tuple[Tensor, ...]]:
    if model == "resnet18":
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size * count, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch_size * count,), generator=g)
    else:
        x, y, _ = load_images(batch_size * count)
    return [
        (a.to(device), b.to(device))
        for a, b in zip(x.split(batch_size), y.split(batch_size), strict=True)
    ]


def make_optimizer(method: str, model: nn.Module, interval: int) -> torch.optim.Optimizer:
    """The method's optimizer: ``name/variant`` with the variant's options on top of the
    paper's rule (``eig_method="power"``, 5 products every ``interval`` steps; ``/train``:
    ``hessian_mode="train"``; ``/lanczos4``; ``/fd-forward``), or ``/default``: the library's
    defaults (warm power iteration, 2 products every 40 steps; ``interval`` unused)."""
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), **sgd)
    if method == "sam":
        return SAM(model, torch.optim.SGD, rho=0.05, **sgd)
    name, _, variant = method.partition("/")
    cls = EigenSAM if name == "eigen-sam" else XSAM
    if variant == "default":
        return cls(model, torch.optim.SGD, rho=0.05, **sgd)
    options: dict[str, Any] = {"eig_method": "power", "eig_iters": 5}
    if variant == "fd-forward":
        options["hvp"] = "fd-forward"
    elif variant == "train":
        options["hessian_mode"] = "train"
    elif variant.startswith("lanczos"):
        options.update(eig_method="lanczos", eig_iters=int(variant.removeprefix("lanczos")))
    return cls(model, torch.optim.SGD, rho=0.05, eig_interval=interval, **options, **sgd)


def takes_batch(method: str) -> bool:
    """Whether the step passes the batch (``step(closure, batch=(x, y))``, the documented
    memory-lean path: ``hessian_parts="auto"`` splits exact products) or a plain closure
    (``/whole`` and ``/train``: whole-batch products, as before the batch argument existed)."""
    return method.partition("/")[2] not in ("whole", "train")


class Stepper:
    """One method's model and optimizer; ``step`` runs one training step on a batch and returns
    the time spent inside the closure (to separate the optimizer's own overhead)."""

    def __init__(self, method: str, model_name: str, device: str, interval: int):
        self.method = method
        self.model = make_model(model_name, device)
        self.opt = make_optimizer(method, self.model, interval)

    def step(self, x: Tensor, y: Tensor) -> float:
        inside = 0.0

        def closure(x: Tensor, y: Tensor) -> Tensor:
            nonlocal inside
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
            inside += time.perf_counter() - start
            return loss

        if isinstance(self.opt, EigenSAM | XSAM) and takes_batch(self.method):
            self.opt.step(closure, batch=(x, y))
        elif isinstance(self.opt, SAM):
            self.opt.step(lambda: closure(x, y))
        else:
            self.opt.zero_grad()
            closure(x, y)
            self.opt.step()
        return inside

    def refresh_next(self) -> None:
        if isinstance(self.opt, EigenSAM | XSAM):
            self.opt.sam_steps = 0


class Clock:
    """Wall time on CPU; CUDA events (synchronized) on a GPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def time(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1e3


# -- 1. step time ---------------------------------------------------------------------------


def time_table(model_name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per round: each method's refresh step, then ``--plain-steps`` cycles of one plain step
    per method (round robin, so load changes on a shared machine hit all methods alike).
    Ratios are medians of per-cycle ratios; over the interval ``p`` a method costs
    ``((p − 1)·plain + refresh) / p``."""
    methods = TIME_METHODS[model_name]
    clock = Clock(args.device)
    data = make_batches(model_name, args.batch_size, args.plain_steps + 1, args.device)
    steppers = {m: Stepper(m, model_name, args.device, args.interval) for m in methods}
    for s in steppers.values():  # warm-up, including one refresh
        s.refresh_next()
        for x, y in data[:2]:
            s.step(x, y)
    refresh: dict[str, list[float]] = {m: [] for m in methods}
    plain: dict[str, list[float]] = {m: [] for m in methods}
    inside: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m, s in steppers.items():
            s.refresh_next()
            x, y = data[0]
            refresh[m].append(clock.time(lambda s=s, x=x, y=y: s.step(x, y)))
        for x, y in data[1:]:
            for m, s in steppers.items():
                plain[m].append(
                    clock.time(lambda s=s, x=x, y=y, m=m: inside[m].append(s.step(x, y)))
                )
    per_round = args.plain_steps

    def interval(m: str) -> int:
        """``m``'s steps per refresh (``--interval``, or the library default's own)."""
        tracker = getattr(steppers[m].opt, "tracker", None)
        return args.interval if tracker is None else tracker.interval

    def round_median(m: str, r: int) -> float:
        return statistics.median(plain[m][r * per_round : (r + 1) * per_round])

    def ratio(m: str, base: str) -> float:
        """``m``'s step over the interval / ``base``'s plain step: medians of per-cycle and
        per-round ratios."""
        plain_ratio = statistics.median(a / b for a, b in zip(plain[m], plain[base], strict=True))
        refresh_ratio = statistics.median(
            refresh[m][r] / round_median(base, r) for r in range(args.rounds)
        )
        p = interval(m)
        return ((p - 1) * plain_ratio + refresh_ratio) / p

    def refresh_cost(m: str) -> float:
        """Extra time of a refresh step over a plain step, in SGD steps."""
        return statistics.median(
            (refresh[m][r] - round_median(m, r)) / round_median("sgd", r)
            for r in range(args.rounds)
        )

    return [
        {
            "model": model_name,
            "method": m,
            "plain_step_s": statistics.median(plain[m]),
            "refresh_step_s": statistics.median(refresh[m]),
            "over_sgd": ratio(m, "sgd"),
            "over_sam": ratio(m, "sam"),
            "refresh_in_sgd_steps": refresh_cost(m),
            "overhead": 1 - sum(inside[m]) / sum(plain[m]),
        }
        for m in methods
    ]


def time_child(allocator: str, model_name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """:func:`time_table` in this fresh process, with glibc's default allocator or with freed
    memory kept (:func:`eigensam.allocator.keep_freed_memory`, what the ``eigensam`` command
    does)."""
    if allocator == "kept" and not keep_freed_memory():
        raise RuntimeError("keep_freed_memory() did not apply (needs Linux with glibc)")
    return [{"allocator": allocator, **row} for row in time_table(model_name, args)]


# -- 2. peak memory, each in a fresh process ------------------------------------------------


def rss_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


class PeakMemory:
    """Peak memory growth (MiB) of what runs between ``start()`` and ``stop()``."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        warm = nn.Conv2d(1, 1, 3)  # load kernels and start autograd threads before the baseline
        warm(torch.randn(2, 1, 5, 5)).sum().backward()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak (VmHWM) to the current resident size
        self.base = rss_kib("VmRSS") * 1024

    def stop(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (rss_kib("VmHWM") * 1024 - self.base) / 2**20


def child(
    kind: str, name: str, model_name: str, args: argparse.Namespace, batch: int | None = None
) -> Any:
    """Run ``python this --child KIND NAME MODEL`` in a fresh process and return what it prints
    (JSON): the peak memory growth (MiB) of a memory child at ``batch`` (default: the model's
    ``memory_batch_size``), the rows of a time child."""
    command = [sys.executable, __file__, "--child", kind, name, model_name, "--device", args.device]
    batch = args.memory_batch_size.get(model_name) if batch is None else batch
    if batch is not None:  # a time child of a model without an HVP-table batch needs none
        command += ["--memory-batch-size", str(batch)]
    for option in ("batch_size", "interval", "plain_steps", "rounds"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    # glibc's default whatever the caller's environment says; live memory for the peaks.
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    if kind in ("memory", "hvp-memory"):
        env.update(LIVE_MEMORY)
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_child(method: str, model_name: str, args: argparse.Namespace) -> float:
    """Peak growth of 2 steps with a refresh each (``eig_interval = 1``)."""
    data = make_batches(model_name, args.memory_batch_size[model_name], 2, args.device)
    stepper = Stepper(method, model_name, args.device, interval=1)
    meter = PeakMemory(args.device)
    meter.start()
    for x, y in data:
        stepper.step(x, y)
    return meter.stop()


def memory_table(model_name: str, batch: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    peaks = {m: child("memory", m, model_name, args, batch) for m in MEMORY_METHODS}
    return [
        {
            "model": model_name,
            "batch_size": batch,
            "method": m,
            "peak_mib": peak,
            "over_sgd": peak / peaks["sgd"],
            "over_sam": peak / peaks["sam"],
        }
        for m, peak in peaks.items()
    ]


# -- 3. HVP backends ------------------------------------------------------------------------


class Products:
    """``v ↦ H v`` on one batch for each backend of the table."""

    def __init__(self, model_name: str, batch_size: int, device: str):
        self.model = make_model(model_name, device)
        ((self.x, self.y),) = make_batches(model_name, batch_size, 1, device)
        self.params = list(self.model.parameters())
        self.dim = sum(p.numel() for p in self.params)
        self.split = split_closure(self.model, nn.functional.cross_entropy, self.x, self.y, PARTS)

    def gradient(self) -> None:
        self.model.zero_grad()
        self.split.closure()

    def run(self, backend: str, vectors: list[Tensor], clock: Clock) -> tuple[list[Tensor], float]:
        """Products with each vector and the time per product after the first (which builds
        the graph or the base gradient)."""
        if backend == "forward-over-reverse":
            names = [n for n, _ in self.model.named_parameters()]
            primals = {n: p.detach() for n, p in self.model.named_parameters()}

            def loss(params: dict[str, Tensor]) -> Tensor:
                out = functional_call(self.model, params, (self.x,))
                return nn.functional.cross_entropy(out, self.y)

            def matvec(v: Tensor) -> Tensor:
                tangents = dict(zip(names, unflatten(v, self.params), strict=True))
                _, hv = jvp(grad(loss), (primals,), (tangents,))
                return flatten([hv[n] for n in names], self.params)

            return self._timed(matvec, vectors, clock)
        name, _, split = backend.partition("/")
        closure = self.split if split else self.split.closure
        with HessianOperator(closure, self.params, backend=name, model=self.model) as op:
            return self._timed(op.matvec, vectors, clock)

    @staticmethod
    def _timed(matvec: Callable[[Tensor], Tensor], vectors: list[Tensor], clock: Clock):
        products = [matvec(vectors[0])]
        elapsed = 0.0
        for v in vectors[1:]:
            elapsed += clock.time(lambda v=v: products.append(matvec(v)))
        return products, elapsed / (len(vectors) - 1)


def hvp_memory_child(backend: str, model_name: str, args: argparse.Namespace) -> float:
    """Peak growth of 5 products (the gradient alone for backend ``"gradient"``)."""
    products = Products(model_name, args.memory_batch_size[model_name], args.device)
    vectors = [torch.randn(products.dim, device=args.device) for _ in range(5)]
    meter = PeakMemory(args.device)
    meter.start()
    if backend == "gradient":
        products.gradient()
    else:
        products.run(backend, vectors, Clock(args.device))
    return meter.stop()


def hvp_table(model_name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    clock = Clock(args.device)
    products = Products(model_name, args.memory_batch_size[model_name], args.device)
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(products.dim, generator=g).to(args.device) for _ in range(args.hvps)]
    vectors = [v / v.norm() for v in vectors]
    exact, _ = products.run("autograd", vectors, clock)
    closure = products.split.closure
    with HessianOperator(closure, products.params, backend="autograd", model=products.model) as op:
        top = power_iteration(op.matvec, vectors[0], 50).eigenvector
    exact_top, _ = products.run("autograd", [top, top], clock)
    products.gradient()
    grad_time = statistics.median(clock.time(products.gradient) for _ in range(args.hvps))
    grad_memory = child("hvp-memory", "gradient", model_name, args)
    rows = []
    for backend in HVP_BACKENDS:
        result, per_product = products.run(backend, vectors, clock)
        along_top, _ = products.run(backend, [top, top], clock)
        rel = [float((p - e).norm() / e.norm()) for p, e in zip(result, exact, strict=True)]
        cos = [
            float(nn.functional.cosine_similarity(p, e, dim=0))
            for p, e in zip(result, exact, strict=True)
        ]
        peak = child("hvp-memory", backend, model_name, args)
        rows.append(
            {
                "model": model_name,
                "backend": backend,
                "hvp_over_grad": per_product / grad_time,
                "peak_mib": peak,
                "peak_over_grad": peak / grad_memory,
                "max_rel_error": max(rel),
                "min_cosine": min(cos),
                "top_cosine": float(
                    nn.functional.cosine_similarity(along_top[1], exact_top[1], dim=0)
                ),
            }
        )
    return rows


# -- output ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=128, help="step-time batch")
    parser.add_argument("--interval", type=int, default=100, help="p, steps per refresh")
    parser.add_argument("--plain-steps", type=int, default=6, help="steps per round, no refresh")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hvps", type=int, default=4)
    parser.add_argument("--hvp-batch", type=int, default=256, help="batch of the HVP table")
    parser.add_argument(
        "--memory-batches",
        default="simplecnn:16,64,128,256;bn-cnn:128;resnet18:16,64,128",
        help="memory table: MODEL:BATCH,BATCH;... (models simplecnn, bn-cnn, resnet18)",
    )
    parser.add_argument("--sections", default="time,memory,hvp", help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--memory-batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, name, model_name = args.child
        args.memory_batch_size = {model_name: args.memory_batch_size}
        if kind == "time":
            print(json.dumps(time_child(name, model_name, args)))
            return
        run = hvp_memory_child if kind == "hvp-memory" else memory_child
        print(json.dumps(run(name, model_name, args)))
        return
    args.memory_batch_size = {"simplecnn": args.hvp_batch, "gelu-cnn": args.hvp_batch}
    memory_runs = [
        (model_name, int(batch))
        for entry in args.memory_batches.split(";")
        for model_name, _, batches in [entry.partition(":")]
        for batch in batches.split(",")
    ]
    keep_freed_memory()  # the HVP table's timings: compute, not page faults (children: own)
    time_models = [m for m in TIME_METHODS if m != "resnet18" or args.device == "cuda"]
    start = time.perf_counter()
    report: dict[str, Any] = {"machine": machine(args.device), "settings": vars(args).copy()}
    report["settings"]["out"] = str(args.out)
    print(json.dumps(report["machine"]), flush=True)
    sections = [
        (
            "time",
            TIME_COLUMNS,
            lambda: [
                r
                for allocator in ALLOCATORS[args.device]
                for m in time_models
                for r in child("time", allocator, m, args)
            ],
        ),
        (
            "memory",
            MEMORY_COLUMNS,
            lambda: [r for m, b in memory_runs for r in memory_table(m, b, args)],
        ),
        (
            "hvp",
            HVP_COLUMNS,
            lambda: [r for m in ("simplecnn", "gelu-cnn") for r in hvp_table(m, args)],
        ),
    ]
    for name, columns, compute in sections:
        if name not in args.sections.split(","):
            continue
        report[name] = compute()
        print(f"\n{markdown(report[name], columns)}", flush=True)
    report["seconds"] = time.perf_counter() - start
    suffix = "" if args.sections == "time,memory,hvp" else "-" + args.sections.replace(",", "-")
    path = args.out / f"cost-{args.device}{suffix}.json"
    save(report, path)
    print(f"\n{report['seconds']:.0f} s; wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
