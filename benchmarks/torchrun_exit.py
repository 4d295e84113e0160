"""How often a finished ``torchrun ... -m eigensam train`` fails to exit cleanly.

Runs the command ``--runs`` times on 2 gloo processes with the smoke config
``configs/cpu-synthetic-simplecnn.yaml`` for one epoch (synthetic data, Eigen-SAM with refreshes
and tracking), optionally with ``--load`` busy processes competing for the cores (the
abort this guards against, a gloo worker thread freeing tensors during the interpreter's shutdown,
shows up under load). Prints one row per exit status and the count of runs whose output says
"terminate called". Run:

    python benchmarks/torchrun_exit.py [--runs 20] [--load 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = ROOT / "configs" / "cpu-synthetic-simplecnn.yaml"


def one_run(folder: Path, index: int) -> tuple[int, bool]:
    """Exit status of one torchrun job, and whether its output reports the abort."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "eigensam", "train"]
    command += ["--config", str(SMOKE_CONFIG), "--set", "epochs=1"]
    command += ["--out", str(folder / str(index))]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, "terminate called" in done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--load", type=int, default=2, help="busy processes (default: 2)")
    args = parser.parse_args()
    if args.runs < 1 or args.load < 0:
        parser.error(f"--runs must be >= 1 and --load >= 0, got {args.runs} and {args.load}")
    busy = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(args.load)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = [one_run(Path(tmp), i) for i in range(args.runs)]
    finally:
        for process in busy:
            process.kill()
    statuses = collections.Counter(code for code, _ in results)
    print(f"{args.runs} runs, {args.load} busy processes")
    print("| exit status | runs |\n|---|---|")
    for code, count in sorted(statuses.items()):
        print(f"| {code} | {count} |")
    print(f"'terminate called' in the output: {sum(abort for _, abort in results)} runs")


if __name__ == "__main__":
    main()
