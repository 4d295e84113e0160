"""Data-parallel scaling on this CPU: 1 process × 2 threads vs 2 gloo processes × 1 thread.

For SGD, SAM and Eigen-SAM on the paper's SimpleCNN (Fashion-MNIST-shaped batches, real
Fashion-MNIST when it is installed), with the same global batch in every configuration:

- ``1 proc × 2 thr``: one process, ``torch.set_num_threads(2)``, batch ``B`` (and the same
  with 1 thread, for reference);
- ``2 gloo × 1 thr``: ``DistributedDataParallel`` on 2 processes (gloo), ``B/2`` each;
- ``2 local × 1 thr``: the same 2 processes and batches with no communication (plain model,
  no process group in the step), so ``1 − local/gloo`` is the share of the step spent waiting
  for communication (exposed, after DDP's overlap of all-reduce with backward).

It also times one all-reduce of a gradient-sized float32 vector (SimpleCNN, and ResNet-50's
25.6M parameters) on gloo, the unit that Eigen-SAM adds ``eig_iters`` of every ``eig_interval``
steps, and reports (all-reduces per step × that time) / step time: the communication share if
none of it overlapped with computation (an upper bound; DDP overlaps the gradient all-reduce
with the backward pass). Times are medians over ``--rounds`` of ``--steps`` steps (Eigen-SAM
refreshes every ``--eig-interval`` steps, so refreshes are averaged in). The table is printed
and saved to ``benchmarks/results/ddp.json`` and ``.md`` (``--out``; see ``tables.py``), which
docs/distributed.md includes. Run:

    python benchmarks/bench_ddp.py [--batch-size 128] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from common import load_images
from tables import RESULTS, new_report, publish
from torch.nn.parallel import DistributedDataParallel

from eigensam import SAM, EigenSAM
from eigensam.lab.workloads.models import build_model

METHODS = ("sgd", "sam", "eigen-sam")
RESNET50_PARAMS = 25_557_032
# Gradient-sized all-reduces per step (global sharpness); Eigen-SAM adds eig_iters/eig_interval.
ALLREDUCES = {"sgd": 1, "sam": 2, "eigen-sam": 2}


def make_optimizer(
    method: str, model: torch.nn.Module, args: argparse.Namespace, hvp: str = "auto"
) -> Any:
    """``method`` (sgd, adamw, sam or eigen-sam with SGD inside) on ``model``; Eigen-SAM refreshes
    every ``args.eig_interval`` steps with ``args.eig_iters`` products of backend ``hvp``."""
    sgd = dict(lr=0.01, momentum=0.9)
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), **sgd)
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if method == "sam":
        return SAM(model, torch.optim.SGD, 0.05, **sgd)
    return EigenSAM(
        model,
        torch.optim.SGD,
        0.05,
        eig_interval=args.eig_interval,
        eig_iters=args.eig_iters,
        hvp=hvp,
        **sgd,
    )


def time_steps(
    method: str,
    net: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
) -> list[float]:
    """Seconds per step, one value per round, for ``method`` on ``net``."""
    opt = make_optimizer(method, net, args)

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(net(images), labels)
        loss.backward()
        return loss

    def step() -> None:
        if method == "sgd":
            opt.zero_grad(set_to_none=True)
            closure()
            opt.step()
        else:
            opt.step(closure)

    for _ in range(2):  # warm-up
        step()
    rounds = []
    for _ in range(args.rounds):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        rounds.append((time.perf_counter() - start) / args.steps)
    return rounds


def allreduce_seconds(numel: int, reps: int) -> float:
    tensor = torch.ones(numel)
    dist.all_reduce(tensor)
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(
    rank: int, world: int, threads: int, comm: bool, folder: str, args: argparse.Namespace
) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{folder}/store",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=300),
        )
    images, labels, source = load_images(args.batch_size)
    images, labels = images[rank::world], labels[rank::world]
    torch.manual_seed(0)
    model = build_model("simplecnn", 10, 1, 28, args.width)
    result: dict[str, Any] = {
        "source": source,
        "params": sum(p.numel() for p in model.parameters()),
    }
    for method in METHODS:
        net = DistributedDataParallel(model) if comm else model
        per_round = time_steps(method, net, images, labels, args)
        if world > 1:  # the slowest rank sets the pace
            t = torch.tensor(per_round)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            per_round = t.tolist()
        result[method] = statistics.median(per_round)
    if comm:
        result["allreduce_simplecnn"] = allreduce_seconds(result["params"], 20)
        result["allreduce_resnet50"] = allreduce_seconds(RESNET50_PARAMS, 3)
    if rank == 0:
        Path(folder, "result.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        # Skip gloo's teardown: its threads sometimes abort the process at exit
        # ("terminate called without an active exception") after all work is done.
        os._exit(0)


def run(world: int, threads: int, comm: bool, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        context = mp.get_context("spawn")
        procs = [
            context.Process(target=worker, args=(r, world, threads, comm, folder, args))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a benchmark process failed ({world} × {threads}, comm={comm})")
        result = json.loads(Path(folder, "result.json").read_text())
    print(f"{world} × {threads} threads, communication {comm}: {result}", file=sys.stderr)
    return result


COLUMNS = {
    "method": "method",
    "one_two_threads_ms": "1 proc × 2 thr (ms/step)",
    "one_one_thread_ms": "1 proc × 1 thr (ms/step)",
    "ddp_ms": "2 gloo × 1 thr (ms/step)",
    "over_two_threads": "2 gloo / (1 × 2 thr) samples/s",
    "over_one_thread": "2 gloo / (1 × 1 thr) samples/s",
    "local_ms": "2 local × 1 thr (ms/step)",
    "exposed": "exposed communication share",
    "allreduces": "gradient all-reduces per step",
    "allreduce_share": "their time / step time",
}
FORMATS = {key: ".1f" for key in COLUMNS} | {
    "over_two_threads": ".3f",
    "over_one_thread": ".3f",
    "exposed": ".1%",
    "allreduces": "g",
    "allreduce_share": ".2%",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eig-interval", type=int, default=10)
    parser.add_argument("--eig-iters", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "ddp.json")
    args = parser.parse_args()
    start = time.perf_counter()
    report = new_report(parser, args, threads="as in the column headers")
    one = run(1, 2, False, args)
    single = run(1, 1, False, args)
    ddp = run(2, 1, True, args)
    local = run(2, 1, False, args)
    allreduce = ddp["allreduce_simplecnn"]
    rows = []
    for method in METHODS:
        t1, t11, t2, t0 = one[method], single[method], ddp[method], local[method]
        count = ALLREDUCES[method] + (
            args.eig_iters / args.eig_interval if "eigen" in method else 0
        )
        rows.append(
            {
                "method": method,
                "one_two_threads_ms": 1e3 * t1,
                "one_one_thread_ms": 1e3 * t11,
                "ddp_ms": 1e3 * t2,
                "over_two_threads": t1 / t2,
                "over_one_thread": t11 / t2,
                "local_ms": 1e3 * t0,
                "exposed": max(0.0, 1 - t0 / t2),
                "allreduces": float(count),
                "allreduce_share": count * allreduce / t2,
            }
        )
    mb_cnn = 4 * one["params"] / 1e6
    mb_r50 = 4 * RESNET50_PARAMS / 1e6
    notes = {
        "setting": (
            f"SimpleCNN width {args.width} ({one['params']:,} parameters), {one['source']}, "
            f"global batch {args.batch_size} in every column, Eigen-SAM p = {args.eig_interval}, "
            f"q = {args.eig_iters}, medians of {args.rounds} rounds × {args.steps} steps."
        ),
        "allreduce": (
            f"gloo all-reduce between the 2 processes: SimpleCNN gradient ({mb_cnn:.2f} MB) "
            f"{1e3 * allreduce:.2f} ms; ResNet-50 gradient ({mb_r50:.1f} MB) "
            f"{1e3 * ddp['allreduce_resnet50']:.1f} ms, "
            f"{mb_r50 / ddp['allreduce_resnet50'] / 1e3:.2f} GB/s."
        ),
    }
    publish(report, args.out, start, {"scaling": (COLUMNS, rows)}, FORMATS, notes)


if __name__ == "__main__":
    main()
