"""Run a function on 2 CPU processes joined by a gloo process group, with a deadline.

Each process is started with the ``spawn`` method, initializes ``torch.distributed`` from a file
store in a temporary folder (collectives time out after ``COLLECTIVE_TIMEOUT``) and calls
``worker(rank, world_size, folder, *args)``. The parent waits at most ``timeout`` seconds, kills
the processes that are still running (a hanging collective fails the test instead of hanging
it) and raises with every rank's traceback when one failed.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def _entry(
    worker: Callable[..., None], rank: int, world: int, folder: str, args: tuple[Any, ...]
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{folder}/store",
            rank=rank,
            world_size=world,
            timeout=COLLECTIVE_TIMEOUT,
        )
        worker(rank, world, Path(folder), *args)
        dist.barrier()
    except BaseException:
        Path(folder, f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1) from None
    # Skip gloo's teardown: its threads sometimes abort the process at exit ("terminate called
    # without an active exception") after all the work is done and checked.
    os._exit(0)


def run_ranks(
    worker: Callable[..., None],
    folder: Path,
    *args: Any,
    world: int = 2,
    timeout: float = 300.0,
) -> None:
    """Run ``worker`` on ``world`` processes (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    processes = [
        context.Process(target=_entry, args=(worker, rank, world, str(folder), args))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(processes) if p.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    errors = [
        Path(folder, f"error-rank{rank}.txt").read_text()
        for rank in range(world)
        if Path(folder, f"error-rank{rank}.txt").exists()
    ]
    if hung:
        raise AssertionError(f"ranks {hung} still ran after {timeout} s; errors: {errors}")
    failed = [rank for rank, p in enumerate(processes) if p.exitcode != 0]
    if failed:
        raise AssertionError(f"ranks {failed} failed:\n" + "\n".join(errors))
