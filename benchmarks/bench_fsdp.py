"""DDP vs FSDP2 on 2 gloo CPU processes: per-rank memory and step time of a small ViT.

One transformer configuration (``eigensam.lab.workloads.models.ViT``, 32×32×3 random images,
10 classes),
the same global batch split over 2 processes (1 thread each), and for each of SGD, AdamW, SAM
(SGD inside) and Eigen-SAM (SGD inside, ``eig_interval`` p, ``eig_iters`` q, finite-difference
products ``hvp=FD_FALLBACK`` under both strategies, so that only the strategy differs):

- ``DDP``: ``DistributedDataParallel`` (every rank holds all of ``w``, its gradient, the
  optimizer state, SAM's copy of ``w`` and ``v̂``);
- ``FSDP2``: ``fully_shard`` on every transformer block, then on the root (each rank holds about
  half of each of these; weights are gathered block by block for the passes).

Columns: *state*: bytes of the tensors a rank keeps between steps, counted from the tensors
themselves (its parameters, gradients, base optimizer state, SAM's saved ``w``, ``v̂``);
*peak*: the largest growth of glibc's in-use heap (``mallinfo2``: ``uordblks + hblkhd``) over
its value before the step, sampled after every tensor operation of one step (an Eigen-SAM refresh
step), so it includes the activations, DDP's gradient buckets and FSDP's gathered weights;
*ms/step*: median over ``--rounds`` of ``--steps`` steps (refreshes averaged in), the slower
rank's. The table is printed and saved to ``benchmarks/results/fsdp.json`` and ``.md``
(``--out``; see ``tables.py``), which docs/distributed.md includes. Run:

    python benchmarks/bench_fsdp.py [--dim 128] [--depth 4] [--batch-size 32] [--steps 10]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from bench_ddp import make_optimizer
from tables import RESULTS, new_report, publish
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from eigensam.hessian.hvp import FD_FALLBACK
from eigensam.lab.engine.launch import shard_model
from eigensam.lab.workloads.models import ViT
from eigensam.parallel import local_shard

METHODS = ("sgd", "adamw", "sam", "eigen-sam")
STRATEGIES = ("ddp", "fsdp2")


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = MallInfo2


def heap_in_use() -> int:
    """Bytes glibc's malloc has handed out and not taken back (all arenas, mmapped blocks)."""
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class PeakHeap(TorchDispatchMode):
    """Samples :func:`heap_in_use` after every tensor operation; ``peak`` is the maximum."""

    def __enter__(self) -> PeakHeap:
        self.base = heap_in_use()
        self.peak = self.base
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use())
        return out


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of this rank's part of ``tensors`` (None and non-tensors skipped)."""
    return sum(
        local_shard(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)
    )


def state_bytes(model: torch.nn.Module, opt: Any) -> int:
    params = list(model.parameters())
    base = getattr(opt, "base_optimizer", opt)
    total = tensor_bytes(params) + tensor_bytes(p.grad for p in params)
    total += sum(tensor_bytes(s.values()) for s in base.state.values())
    total += tensor_bytes(getattr(opt, "_saved_params", None) or [])
    tracker = getattr(opt, "tracker", None)
    if tracker is not None:
        total += tensor_bytes([tracker.vector])
    return total


def stepper(
    method: str, net: torch.nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    def closure() -> torch.Tensor:
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    def step() -> None:
        if method in ("sgd", "adamw"):
            opt.zero_grad(set_to_none=True)
            closure()
            opt.step()
        else:
            opt.step(closure)

    return step


def measure(strategy: str, method: str, rank: int, world: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = ViT(10, 3, 32, patch_size=4, dim=args.dim, depth=args.depth, heads=4)
    net = DistributedDataParallel(model) if strategy == "ddp" else shard_model(model)
    opt = make_optimizer(method, net, args, hvp=FD_FALLBACK)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g)[rank::world].contiguous()
    y = torch.randint(0, 10, (args.batch_size,), generator=g)[rank::world].contiguous()
    step = stepper(method, net, opt, x, y)
    step()  # warm-up (allocates the optimizer state); an Eigen-SAM refresh at step 0
    state = state_bytes(model, opt)
    rounds = []
    for _ in range(args.rounds):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        rounds.append((time.perf_counter() - start) / args.steps)
    if hasattr(opt, "tracker"):  # the measured step refreshes v̂
        opt.sam_steps = 0
    dist.barrier()
    with PeakHeap() as heap:
        step()
    return {
        "ms": 1e3 * statistics.median(rounds),
        "state": state,
        "peak": heap.peak - heap.base,
        "params": sum(p.numel() for p in model.parameters()),
    }


def worker(rank: int, world: int, folder: str, args: argparse.Namespace) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=600),
    )
    results: dict[str, Any] = {}
    for strategy in STRATEGIES:
        for method in METHODS:
            result = measure(strategy, method, rank, world, args)
            t = torch.tensor([result["ms"], result["state"], result["peak"]], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slower / larger rank
            results[f"{strategy}/{method}"] = {
                "ms": t[0].item(),
                "state": t[1].item(),
                "peak": t[2].item(),
                "params": result["params"],
            }
            print(f"rank {rank} {strategy}/{method}: {result}", file=sys.stderr)
    if rank == 0:
        Path(folder, "result.json").write_text(json.dumps(results))
    dist.barrier()
    os._exit(0)  # skip gloo's teardown (see benchmarks/bench_ddp.py)


COLUMNS = {
    "method": "method",
    "ddp_state": "DDP state (MB)",
    "fsdp2_state": "FSDP2 state (MB)",
    "state_ratio": "FSDP2 / DDP state",
    "ddp_peak": "DDP peak (MB)",
    "fsdp2_peak": "FSDP2 peak (MB)",
    "ddp_ms": "DDP ms/step",
    "fsdp2_ms": "FSDP2 ms/step",
    "ms_ratio": "FSDP2 / DDP time",
}
FORMATS = {key: ".2f" for key in COLUMNS} | {"ddp_ms": ".1f", "fsdp2_ms": ".1f"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eig-interval", type=int, default=10)
    parser.add_argument("--eig-iters", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "fsdp.json")
    args = parser.parse_args()
    start = time.perf_counter()
    report = new_report(parser, args, threads=1)
    world = 2
    with tempfile.TemporaryDirectory() as folder:
        context = mp.get_context("spawn")
        procs = [context.Process(target=worker, args=(r, world, folder, args)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError("a benchmark process failed")
        results = json.loads(Path(folder, "result.json").read_text())
    rows = []
    for method in METHODS:
        d, f = results[f"ddp/{method}"], results[f"fsdp2/{method}"]
        rows.append(
            {
                "method": method,
                "ddp_state": d["state"] / 1e6,
                "fsdp2_state": f["state"] / 1e6,
                "state_ratio": f["state"] / d["state"],
                "ddp_peak": d["peak"] / 1e6,
                "fsdp2_peak": f["peak"] / 1e6,
                "ddp_ms": d["ms"],
                "fsdp2_ms": f["ms"],
                "ms_ratio": f["ms"] / d["ms"],
            }
        )
    setting = (
        f"ViT dim {args.dim}, depth {args.depth} ({results['ddp/sgd']['params']:,} parameters, "
        f"float32), 32×32×3 random images, global batch {args.batch_size} on 2 gloo processes × "
        f"1 thread; Eigen-SAM p = {args.eig_interval}, q = {args.eig_iters} (`{FD_FALLBACK}` "
        f"products under both strategies); ms/step: median of {args.rounds} round(s) × "
        f"{args.steps} steps."
    )
    tables = {"strategies": (COLUMNS, rows)}
    publish(report, args.out, start, tables, FORMATS, {"setting": setting})


if __name__ == "__main__":
    main()
