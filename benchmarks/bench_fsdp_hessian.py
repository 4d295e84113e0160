"""Lanczos on FSDP2 models: per-rank memory of the sharded basis, time per product, and λ₁
against one process, for 1 (whole model), 2 and 4 gloo CPU processes.

One small ViT (``eigensam.lab.workloads.models.ViT``, 32×32×3 random images, 10 classes,
float32), the same global batch split over the ranks (1 thread each). Every rank runs
``top_eigenvalues(op, k=1, num_iters=m, tol=None)`` (m Lanczos steps with full
reorthogonalization) on a :class:`~eigensam.hessian.hvp.HessianOperator` with central finite
differences (the only products on sharded parameters); one process runs it on the whole model
with the same backend and the concatenated batch.

Columns: *basis (MB)*: bytes of the m Lanczos vectors a rank stores (``m ×`` its share of the
parameters ``× 4``), counted from the layout; *peak (MB)*: the largest growth of glibc's in-use
heap (``mallinfo2``) over its value before the solve, sampled after every tensor operation
(basis, products' activations and FSDP's gathered weights), the largest rank's; *s/product*:
wall time of the solve over m, the slower rank's; *λ₁* and its relative difference from the
one-process value. The table is printed and saved to ``benchmarks/results/fsdp-hessian.json``
and ``.md`` (``--out``; see ``tables.py``), which docs/distributed.md includes. Run:

    python benchmarks/bench_fsdp_hessian.py [--dim 128] [--depth 4] [--iters 40] [--worlds 2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from bench_fsdp import PeakHeap
from tables import RESULTS, new_report, publish

from eigensam.hessian.analysis import top_eigenvalues
from eigensam.hessian.hvp import FD_FALLBACK, HessianOperator
from eigensam.lab.engine.launch import shard_model
from eigensam.lab.workloads.models import ViT
from eigensam.parallel import ParamLayout


def solve(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    """λ₁ by ``args.iters`` Lanczos steps on this rank's share (the whole model when alone)."""
    torch.manual_seed(0)
    model = ViT(10, 3, 32, patch_size=4, dim=args.dim, depth=args.depth, heads=4)
    if world > 1:
        shard_model(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).chunk(world)[rank]
    y = torch.randint(0, 10, (args.batch_size,), generator=g).chunk(world)[rank]

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    params = list(model.parameters())
    layout = ParamLayout(params)
    with HessianOperator(closure, params, backend=FD_FALLBACK, model=model) as op:
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        with PeakHeap() as heap:
            top = top_eigenvalues(op, k=1, num_iters=args.iters, tol=None, seed=0)
        seconds = time.perf_counter() - start
    return {
        "lambda1": top[0].eigenvalue,
        "basis": top[0].num_matvecs * layout.numel * 4,
        "peak": heap.peak - heap.base,
        "seconds": seconds / top[0].num_matvecs,
        "params": layout.global_numel,
    }


def worker(rank: int, world: int, folder: str, args: argparse.Namespace) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=1200),
    )
    result = solve(rank, world, args)
    t = torch.tensor([result["basis"], result["peak"], result["seconds"]], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the largest / slower rank
    print(f"rank {rank}/{world}: {result}", file=sys.stderr)
    if rank == 0:
        result.update(basis=t[0].item(), peak=t[1].item(), seconds=t[2].item())
        Path(folder, "result.json").write_text(json.dumps(result))
    dist.barrier()
    os._exit(0)  # skip gloo's teardown (see benchmarks/bench_ddp.py)


def run(world: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        context = mp.get_context("spawn")
        procs = [
            context.Process(target=worker, args=(r, world, folder, args)) for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a benchmark process failed (world {world})")
        return dict(json.loads(Path(folder, "result.json").read_text()))


COLUMNS = {
    "processes": "processes",
    "basis_mb": "basis per rank (MB)",
    "basis_share": "/ one process's",
    "peak_mb": "peak per rank (MB)",
    "peak_share": "/ one process's",
    "s_per_product": "s/product",
    "lambda1": "λ₁",
    "vs_one": "vs one process",
}
FORMATS = {
    "basis_mb": ".1f",
    "basis_share": ".3f",
    "peak_mb": ".1f",
    "peak_share": ".3f",
    "s_per_product": ".3f",
    "lambda1": ".6g",
    "vs_one": ".1e",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch")
    parser.add_argument("--iters", type=int, default=40, help="Lanczos steps m")
    parser.add_argument("--worlds", default="2,4", help="process counts besides 1")
    parser.add_argument("--out", type=Path, default=RESULTS / "fsdp-hessian.json")
    args = parser.parse_args()
    start = time.perf_counter()
    report = new_report(parser, args, threads=1)
    worlds = [1, *(int(w) for w in args.worlds.split(","))]
    results = {world: run(world, args) for world in worlds}
    one = results[1]
    rows = [
        {
            "processes": "1 (whole model)" if world == 1 else f"{world} (FSDP2)",
            "basis_mb": r["basis"] / 1e6,
            "basis_share": r["basis"] / one["basis"],
            "peak_mb": r["peak"] / 1e6,
            "peak_share": r["peak"] / one["peak"],
            "s_per_product": r["seconds"],
            "lambda1": r["lambda1"],
            "vs_one": abs(r["lambda1"] - one["lambda1"]) / abs(one["lambda1"]),
        }
        for world, r in results.items()
    ]
    setting = (
        f"ViT dim {args.dim}, depth {args.depth} ({one['params']:,} parameters, float32), "
        f"32×32×3 random images, global batch {args.batch_size}, {args.iters} Lanczos steps "
        f"with `{FD_FALLBACK}` products, gloo processes × 1 thread."
    )
    publish(report, args.out, start, {"lanczos": (COLUMNS, rows)}, FORMATS, {"setting": setting})


if __name__ == "__main__":
    main()
