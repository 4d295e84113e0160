"""λ₁ of the generalized Gauss-Newton matrix against λ₁ of the Hessian during training.

One SAM run at the converged CPU scale of the reproduction (the headline's SimpleCNN at quarter
width on 1,024 Fashion-MNIST images, 60 epochs, seed 0; ``eigensam.lab.experiments.runs``),
with snapshots after epochs 1, 2, 4, 8, 15, 30, 45 and the final weights. At each: λ₁ of the
Hessian (:class:`~eigensam.hessian.dataset.DatasetHessian`) and of the GGN
(:class:`~eigensam.hessian.ggn.GGNOperator`) of the training loss averaged over the first
``--data-subset`` training images (train mode, Lanczos to relative residual 1e-4), the
|cosine| between their top eigenvectors and the seconds per product of each. The table is
printed and saved to ``benchmarks/results/ggn.json`` and ``.md`` (``--out``; see ``tables.py``),
which docs/hessian.md includes, and the figure is drawn from the same rows. Run (about 10
CPU-minutes, the training included):

    python benchmarks/bench_ggn.py [--run runs/ggn-sam] [--data-subset 512] \
        [--figure docs/figures/ggn_vs_hessian.png]

The run is trained first when ``--run`` holds no finished run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tables import RESULTS, new_report, publish, span

from eigensam.hessian import DatasetHessian, GGNOperator, abs_cosine, top_eigenvalues
from eigensam.lab.engine.config import TrainConfig
from eigensam.lab.engine.train import Trainer
from eigensam.lab.engine.trained_model import fixed_batches, load_trained
from eigensam.lab.experiments.runs import CPU_BASE

SNAPSHOTS = [1, 2, 4, 8, 15, 30, 45]


def trained_run(folder: Path) -> bool:
    """Train the headline-scale SAM run (seed 0) into ``folder`` unless it is finished; whether
    it trained."""
    if (folder / "summary.json").exists():
        return False
    fields = {**CPU_BASE, "method": "sam", "seed": 0, "track_every": 0, "track_batches": 0}
    config = TrainConfig(**{**fields, "snapshot_epochs": SNAPSHOTS, "out_dir": str(folder)})
    Trainer(config).run()
    return True


def measure(checkpoint: Path, data_subset: int) -> dict[str, float]:
    """λ₁ of H and of G at one checkpoint, the |cos| of their top eigenvectors and the
    seconds per product."""
    trained = load_trained(checkpoint)
    batches = fixed_batches(trained.config, data_subset, 128)
    row: dict[str, float] = {"step": trained.step}
    vectors = {}
    for name, operator in [
        ("hessian", DatasetHessian(trained.model, batches, mode="train")),
        ("ggn", GGNOperator(trained.model, batches, mode="train")),
    ]:
        with operator as op:
            start = time.perf_counter()
            (top,) = top_eigenvalues(op, 1, num_iters=200, tol=1e-4, seed=0)
            seconds = time.perf_counter() - start
        row[f"lambda1_{name}"] = top.eigenvalue
        row[f"matvecs_{name}"] = top.num_matvecs
        row[f"seconds_per_product_{name}"] = seconds / top.num_matvecs
        vectors[name] = top.eigenvector
    row["abs_cos"] = abs_cosine(vectors["hessian"], vectors["ggn"])
    return row


def figure(rows: list[dict[str, float]], path: Path) -> None:
    fig = Figure(figsize=(6.4, 4.0), dpi=120, layout="constrained")
    axes = fig.add_subplot()
    steps = [r["step"] for r in rows]
    axes.plot(steps, [r["lambda1_hessian"] for r in rows], "o-", label="λ₁(H), Hessian")
    axes.plot(steps, [r["lambda1_ggn"] for r in rows], "s--", label="λ₁(G), Gauss-Newton")
    axes.set_xscale("log")
    axes.set_xlabel("training step (SAM, log scale)")
    axes.set_ylabel("top eigenvalue of the training loss")
    axes.set_title("SimpleCNN (width 0.25), 1,024 Fashion-MNIST images, 60 epochs")
    axes.grid(alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))


COLUMNS = {
    "step": "step",
    "lambda1_hessian": "λ₁(H)",
    "lambda1_ggn": "λ₁(G)",
    "ratio": "λ₁(G)/λ₁(H)",
    "abs_cos": "abs cos(v_H, v_G)",
    "seconds_per_product_hessian": "s/product H",
    "seconds_per_product_ggn": "s/product G",
}
FORMATS = {
    "step": "d",
    "lambda1_hessian": ".4g",
    "lambda1_ggn": ".4g",
    "ratio": ".3f",
    "abs_cos": ".3f",
    "seconds_per_product_hessian": ".3f",
    "seconds_per_product_ggn": ".3f",
}


def summary(rows: list[dict[str, Any]]) -> str:
    """The first snapshot against the later ones (λ₁(G)/λ₁(H) and the |cos|) and the span of
    G's seconds per product over H's."""
    first, later = rows[0], rows[1:]
    cost = (r["seconds_per_product_ggn"] / r["seconds_per_product_hessian"] for r in rows)
    return (
        f"After {first['step']} steps: λ₁(G)/λ₁(H) = {first['ratio']:.3f}, |cos| = "
        f"{first['abs_cos']:.3f}. From step {later[0]['step']} on: λ₁(G)/λ₁(H) in "
        f"{span((r['ratio'] for r in later), '', 3)}, |cos| ≥ "
        f"{min(r['abs_cos'] for r in later):.3f}. Seconds per product of G over H's: "
        f"{span(cost, '', 2)}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/ggn-sam"))
    parser.add_argument("--data-subset", type=int, default=512)
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/ggn_vs_hessian.png"))
    parser.add_argument("--out", type=Path, default=RESULTS / "ggn.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    report = new_report(parser, args, threads=1)
    trained = trained_run(args.run)
    checkpoints = [args.run / f"checkpoint-epoch{e}.pt" for e in SNAPSHOTS]
    rows = [measure(c, args.data_subset) for c in [*checkpoints, args.run / "checkpoint.pt"]]
    for row in rows:
        row["ratio"] = row["lambda1_ggn"] / row["lambda1_hessian"]
    figure(rows, args.figure)
    setting = (
        f"SAM, SimpleCNN width {CPU_BASE['width']}, {CPU_BASE['train_subset']:,} Fashion-MNIST "
        f"images, {CPU_BASE['epochs']} epochs, seed 0 (`{args.run}`, "
        f"{'trained by this command' if trained else 'trained by an earlier command'}); the "
        f"training loss over its first {args.data_subset} images in train mode, Lanczos to "
        f"relative residual 1e-4. The figure `{args.figure}` is drawn from these rows."
    )
    notes = {"setting": setting, "summary": summary(rows)}
    publish(report, args.out, start, {"ggn": (COLUMNS, rows)}, FORMATS, notes)


if __name__ == "__main__":
    main()
