"""Curvature reports of a trained model, written as JSON and PNG files.

The two reports take a model already in memory and a fixed list of batches, so a command-line tool
only loads the model and the data; the estimates come from :mod:`eigensam.hessian.analysis`:

- :func:`spectrum_report`: top-k eigenvalues (Lanczos), trace (Hutch++) and spectral density (SLQ),
  written as ``spectrum.json`` and ``spectrum.png`` (log-scale density, like Figure 3 right of
  the Eigen-SAM paper);
- :func:`block_spectrum_report`: λ₁ and trace of every block of parameters (one per layer by
  default), written as ``spectrum_blocks.json``, ``spectrum_blocks.png`` and the Markdown table
  of :func:`blocks_table` (``spectrum_blocks.md``);
- :func:`power_convergence_report`: alignment of the top-eigenvector estimate with a converged
  ``v₁`` as a function of the number of Hessian-vector products, power iteration vs Lanczos, cold
  vs warm start (the paper's Figure 5), written as ``power_convergence.json`` and ``.png``.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn

from eigensam.atomic import atomic_write
from eigensam.hessian.analysis import (
    TRACE_METHODS,
    check_choice,
    check_tolerance,
    density,
    density_curve,
    estimates_by_step,
    seeded_generator,
    top_eigenvalues,
    trace,
)
from eigensam.hessian.blocks import Block, BlockOperator, layer_blocks
from eigensam.hessian.dataset import Batch, Criterion, DatasetHessian, check_batches
from eigensam.hessian.eigen import (
    EigenResult,
    MatVec,
    check_positive_int,
    lanczos,
    power_iteration,
    random_unit_vector,
)
from eigensam.hessian.ggn import GGNOperator
from eigensam.hessian.metrics import abs_cosine, align

SPECTRUM_SCHEMA = "eigensam.spectrum/1"
CONVERGENCE_SCHEMA = "eigensam.power_convergence/1"
BLOCKS_SCHEMA = "eigensam.spectrum_blocks/1"
# The curvature matrices a report can measure: the Hessian or the generalized Gauss-Newton.
CURVATURES = ("hessian", "ggn")


# --------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """``value`` with tensors turned into lists and non-finite floats into ``None``."""
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _save(out_dir: Path, name: str, report: dict[str, Any], figure: Any) -> None:
    """Write ``{name}.png`` then ``{name}.json`` atomically into ``out_dir``."""

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    atomic_write(out_dir / f"{name}.png", lambda f: f.write(buffer.getvalue()))
    text = json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n"
    atomic_write(out_dir / f"{name}.json", lambda f: f.write(text.encode()))


def _out_dir(out_dir: str | os.PathLike[str]) -> Path:
    if not isinstance(out_dir, str | os.PathLike):
        raise TypeError(f"out_dir must be a path, got {out_dir!r}")
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"out_dir must be a directory, got the file {str(path)!r}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _settings(
    op: DatasetHessian | GGNOperator, criterion: Criterion | None, seed: int, **extra: Any
) -> dict[str, Any]:
    criterion_name = "CrossEntropyLoss" if criterion is None else type(criterion).__name__
    return {
        **extra,
        "curvature": "ggn" if isinstance(op, GGNOperator) else "hessian",
        "mode": op.mode,
        "backend": op.backend if isinstance(op, DatasetHessian) else None,
        "seed": seed,
        "criterion": criterion_name,
        "model": type(op.model).__name__,
        "num_batches": len(op.batches),
        "batch_sizes": op.batch_sizes,
        "num_samples": op.num_samples,
        "dim": op.dim,
        "dtype": str(op.dtype),
        "device": str(op.device),
    }


def curvature_operator(
    model: nn.Module,
    batches: Sequence[Batch],
    criterion: Criterion | None,
    curvature: str,
    **options: Any,
) -> DatasetHessian | GGNOperator:
    """The (not yet opened) operator of ``curvature`` over ``batches``: the Hessian
    (:class:`~eigensam.hessian.dataset.DatasetHessian`, with ``options`` backend, mode, params,
    check) or the GGN (:class:`~eigensam.hessian.ggn.GGNOperator`, with mode and params)."""
    check_choice("curvature", curvature, CURVATURES)
    if curvature == "hessian":
        return DatasetHessian(model, batches, criterion, **options)
    return GGNOperator(model, batches, criterion, mode=options["mode"], params=options["params"])


def _check_matvecs(op: DatasetHessian | GGNOperator) -> int:
    """Products a DatasetHessian spent on determinism checks (the GGN makes none)."""
    return op.num_check_matvecs if isinstance(op, DatasetHessian) else 0


def _eigen_dict(result: EigenResult) -> dict[str, Any]:
    scale = abs(result.eigenvalue)
    return {
        "eigenvalue": result.eigenvalue,
        "residual": result.residual,
        "relative_residual": result.residual / scale if scale > 0 else float("inf"),
        "converged": result.converged,
        "num_matvecs": result.num_matvecs,
    }


def _timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Spectrum report (Figure 3 right)
# --------------------------------------------------------------------------------------------


def spectrum_report(
    model: nn.Module,
    batches: Sequence[Batch],
    out_dir: str | os.PathLike[str],
    *,
    criterion: Criterion | None = None,
    top_k: int = 1,
    lanczos_iters: int = 90,
    num_probes: int = 1,
    trace_matvecs: int = 99,
    trace_method: str = "hutchpp",
    eig_iters: int = 100,
    eig_tol: float = 1e-3,
    mode: str | None = "train",
    backend: str = "autograd",
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    check: bool = True,
    label: str | None = None,
    curvature: str = "hessian",
) -> dict[str, Any]:
    """Top-``top_k`` eigenvalues, trace and spectral density of the Hessian of the loss averaged
    over ``batches`` (:class:`~eigensam.hessian.dataset.DatasetHessian`, in ``mode`` with
    ``backend``; ``curvature="ggn"``: of the generalized Gauss-Newton matrix,
    :class:`~eigensam.hessian.ggn.GGNOperator`), written to ``out_dir/spectrum.json`` and
    ``out_dir/spectrum.png``.

    - eigenvalues: Lanczos (algebraically largest), at most ``eig_iters`` products, stopping at
      relative residual ``eig_tol`` (seed ``seed``);
    - trace: ``trace_method`` ("hutchpp" or "hutchinson") with ``trace_matvecs`` products and its
      standard error (seed ``seed + 1``);
    - density: SLQ with ``num_probes`` probes of ``lanczos_iters`` steps (seed ``seed + 2``); the
      JSON keeps the quadrature nodes and weights and the smoothed curve that is plotted.

    The PNG shows the density on a log scale with ``λ₁`` and the trace in the title (prefixed by
    ``label``). Returns the dictionary written as JSON (products counted, seconds timed per part).
    """
    for name, value in [
        ("top_k", top_k),
        ("lanczos_iters", lanczos_iters),
        ("num_probes", num_probes),
        ("trace_matvecs", trace_matvecs),
        ("eig_iters", eig_iters),
    ]:
        check_positive_int(name, value)
    check_tolerance("eig_tol", eig_tol)
    check_choice("trace_method", trace_method, TRACE_METHODS)
    if trace_method == "hutchpp" and trace_matvecs < 3:
        raise ValueError(f"trace_matvecs must be >= 3 for Hutch++, got {trace_matvecs}")
    directory = _out_dir(out_dir)
    started = time.perf_counter()
    operator = curvature_operator(
        model, batches, criterion, curvature, backend=backend, mode=mode, params=params, check=check
    )
    counts: dict[str, int] = {}
    seconds: dict[str, float] = {}

    def measured(name: str, function: Callable[[], Any]) -> Any:
        before = operator.num_matvecs
        value, seconds[name] = _timed(function)
        counts[name] = operator.num_matvecs - before
        return value

    with operator as op:
        eigen = measured(
            "eigenvalues",
            lambda: top_eigenvalues(op, top_k, num_iters=eig_iters, tol=eig_tol, seed=seed),
        )
        trace_estimate = measured(
            "trace", lambda: trace(op, trace_matvecs, method=trace_method, seed=seed + 1)
        )
        spectral = measured(
            "density", lambda: density(op, lanczos_iters, num_probes, seed=seed + 2)
        )
    counts["determinism_check"] = _check_matvecs(operator)
    counts["total"] = operator.num_matvecs + counts["determinism_check"]
    grid, curve, sigma = density_curve(spectral)
    seconds["total"] = time.perf_counter() - started
    report: dict[str, Any] = {
        "schema": SPECTRUM_SCHEMA,
        "label": label,
        "lambda_max": eigen[0].eigenvalue,
        "eigenvalues": [_eigen_dict(result) for result in eigen],
        "trace": {"method": trace_method, **trace_estimate.to_dict()},
        "density": spectral.to_dict(),
        "density_curve": {"sigma": sigma, "grid": grid, "values": curve},
        "settings": _settings(
            operator,
            criterion,
            seed,
            top_k=top_k,
            eig_iters=eig_iters,
            eig_tol=eig_tol,
            lanczos_iters=lanczos_iters,
            num_probes=num_probes,
            trace_matvecs=trace_matvecs,
            trace_method=trace_method,
        ),
        "num_matvecs": counts,
        "num_batch_evaluations": getattr(operator, "num_batch_evaluations", None),
        "seconds": seconds,
        "files": {"json": "spectrum.json", "png": "spectrum.png"},
    }
    _save(directory, "spectrum", report, _spectrum_figure(report, grid, curve))
    return report


def _spectrum_figure(report: dict[str, Any], grid: Tensor, curve: Tensor) -> Any:

    figure = Figure(figsize=(6.0, 4.2), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    peak = float(curve.max())
    floor = max(float(curve[curve > 0].min()) if bool((curve > 0).any()) else 0.0, peak * 1e-12)
    axes.semilogy(grid.numpy(), curve.clamp_min(floor).numpy(), color="tab:blue", lw=1.2)
    for i, entry in enumerate(report["eigenvalues"]):
        axes.axvline(
            entry["eigenvalue"],
            color="tab:red",
            lw=1.0 if i == 0 else 0.6,
            ls="--",
            label="λ₁ (Lanczos)" if i == 0 else "λ₂…λ_k" if i == 1 else None,
        )
    axes.set_ylim(bottom=floor, top=peak * 3)
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density (log scale)")
    estimate = report["trace"]
    error = estimate["std_error"]
    trace_text = f"{estimate['estimate']:.4g}" + ("" if error is None else f" ± {error:.2g}")
    title = f"λ₁ = {report['lambda_max']:.4g}, tr(H) = {trace_text}"
    axes.set_title(title if report["label"] is None else f"{report['label']}: {title}")
    axes.legend(loc="upper right", fontsize="small")
    axes.grid(alpha=0.3)
    return figure


# --------------------------------------------------------------------------------------------
# Per-block spectra
# --------------------------------------------------------------------------------------------


def block_spectrum_report(
    model: nn.Module,
    batches: Sequence[Batch],
    out_dir: str | os.PathLike[str],
    *,
    blocks: Sequence[Block] | None = None,
    criterion: Criterion | None = None,
    curvature: str = "hessian",
    trace_matvecs: int = 30,
    eig_iters: int = 100,
    eig_tol: float = 1e-3,
    mode: str | None = "train",
    backend: str = "autograd",
    seed: int = 0,
    check: bool = True,
    label: str | None = None,
) -> dict[str, Any]:
    """λ₁ and trace of the curvature restricted to each block of parameters,
    ``H_BB = P_B H P_Bᵀ`` (:class:`~eigensam.hessian.blocks.BlockOperator`), written to
    ``out_dir/spectrum_blocks.json``, ``.png`` (one bar per block for each) and ``.md``
    (:func:`blocks_table`).

    ``blocks`` (default: :func:`~eigensam.hessian.blocks.layer_blocks`, one per layer) are
    module names, parameter names or glob patterns (a list entry may itself be a list: one block).
    The operator over ``batches`` is opened once (``curvature`` "hessian" or "ggn", as in
    :func:`spectrum_report`); per block: Lanczos λ₁ (at most ``eig_iters`` products, relative
    residual ``eig_tol``, seed ``seed``) and the Hutch++ trace with ``trace_matvecs`` products
    (seed ``seed + 1``) and its standard error. Each block product costs one full product.
    """
    check_positive_int("eig_iters", eig_iters)
    check_positive_int("trace_matvecs", trace_matvecs)
    check_tolerance("eig_tol", eig_tol)
    if trace_matvecs < 3:
        raise ValueError(f"trace_matvecs must be >= 3 for Hutch++, got {trace_matvecs}")
    directory = _out_dir(out_dir)
    started = time.perf_counter()
    chosen: list[Block] = layer_blocks(model) if blocks is None else list(blocks)
    if not chosen:
        raise ValueError("blocks must name at least one block, got none")
    operator = curvature_operator(
        model, batches, criterion, curvature, backend=backend, mode=mode, params=None, check=check
    )
    restricted = [BlockOperator(operator, model, block) for block in chosen]  # checks every name
    rows = []
    with operator:
        for block, op in zip(chosen, restricted, strict=True):
            before = op.num_matvecs
            (top,), seconds = _timed(
                lambda op=op: top_eigenvalues(op, 1, num_iters=eig_iters, tol=eig_tol, seed=seed)
            )
            estimate = trace(op, min(trace_matvecs, 3 * op.dim), seed=seed + 1)
            rows.append(
                {
                    "block": block if isinstance(block, str) else list(block),
                    "parameters": op.names,
                    "dim": op.dim,
                    "lambda_max": _eigen_dict(top),
                    "trace": estimate.to_dict(),
                    "num_matvecs": op.num_matvecs - before,
                    "seconds_lambda_max": seconds,
                }
            )
    report: dict[str, Any] = {
        "schema": BLOCKS_SCHEMA,
        "label": label,
        "blocks": rows,
        "settings": _settings(
            operator,
            criterion,
            seed,
            eig_iters=eig_iters,
            eig_tol=eig_tol,
            trace_matvecs=trace_matvecs,
        ),
        "num_matvecs": operator.num_matvecs,
        "seconds": time.perf_counter() - started,
        "files": {
            "json": "spectrum_blocks.json",
            "png": "spectrum_blocks.png",
            "md": "spectrum_blocks.md",
        },
    }
    _save(directory, "spectrum_blocks", report, _blocks_figure(report))
    table = blocks_table(_jsonable(report))
    atomic_write(directory / "spectrum_blocks.md", lambda f: f.write(table.encode()))
    return report


def _block_name(block: str | list[str]) -> str:
    return block if isinstance(block, str) else "+".join(block)


def blocks_table(report: dict[str, Any]) -> str:
    """The Markdown table of a :func:`block_spectrum_report` (as saved in its JSON): one row per
    block with its size, λ₁ and Hutch++ trace ± standard error."""
    lines = ["| block | params | λ₁ | trace (± s.e.) |", "|---|---|---|---|"]
    for row in report["blocks"]:
        estimate, error = row["trace"]["estimate"], row["trace"]["std_error"]
        trace_text = f"{estimate:.4g}" + ("" if error is None else f" ± {error:.2g}")
        eigenvalue = row["lambda_max"]["eigenvalue"]
        lines.append(
            f"| {_block_name(row['block'])} | {row['dim']:,} | {eigenvalue:.4g} | {trace_text} |"
        )
    return "\n".join(lines) + "\n"


def _blocks_figure(report: dict[str, Any]) -> Any:
    rows = report["blocks"]
    names = [_block_name(r["block"]) for r in rows]
    figure = Figure(figsize=(max(6.0, 0.5 * len(rows) + 3), 5.0), dpi=120, layout="constrained")
    panels = [
        ("λ₁ of the block", [r["lambda_max"]["eigenvalue"] for r in rows], None),
        (
            "trace of the block (Hutch++ ± s.e.)",
            [r["trace"]["estimate"] for r in rows],
            [r["trace"]["std_error"] or 0.0 for r in rows],
        ),
    ]
    for index, (ylabel, values, errors) in enumerate(panels):
        axes = figure.add_subplot(2, 1, index + 1)
        axes.bar(range(len(rows)), values, yerr=errors, color="tab:blue", capsize=2)
        axes.set_ylabel(ylabel)
        axes.set_xticks(range(len(rows)), names if index == 1 else [], rotation=45, ha="right")
        axes.grid(alpha=0.3, axis="y")
    curvature = "GGN" if report["settings"]["curvature"] == "ggn" else "Hessian"
    title = f"per-block spectrum of the {curvature}"
    figure.suptitle(title if report["label"] is None else f"{report['label']}: {title}")
    return figure


# --------------------------------------------------------------------------------------------
# Convergence of the top-eigenvector estimate (Figure 5)
# --------------------------------------------------------------------------------------------


def _unit_start(vector: Tensor, dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if not isinstance(vector, Tensor) or vector.shape != (dim,) or not vector.is_floating_point():
        shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise ValueError(
            f"warm_start as a vector must be a float tensor of shape ({dim},), got {shape}"
        )
    norm = float(vector.double().norm())
    if not math.isfinite(norm) or norm == 0:
        raise ValueError(f"warm_start must be a finite nonzero vector, got norm {norm}")
    return (vector.detach() / norm).to(dtype=dtype, device=device)


def power_convergence_report(
    model: nn.Module,
    batches: Sequence[Batch],
    out_dir: str | os.PathLike[str],
    *,
    criterion: Criterion | None = None,
    max_steps: int = 20,
    warm_start: Tensor | Sequence[Batch] | None = None,
    reference_iters: int = 200,
    reference_tol: float = 1e-6,
    mode: str | None = "train",
    backend: str = "autograd",
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    check: bool = True,
    label: str | None = None,
    curvature: str = "hessian",
) -> dict[str, Any]:
    """Alignment of the top-eigenvector estimate with the converged ``v₁`` as a function of the
    number of Hessian-vector products (the Eigen-SAM paper's Figure 5), for power iteration
    (paper Algorithm 1) and Lanczos at equal budgets, from a cold and a warm start. Written to
    ``out_dir/power_convergence.json`` and ``.png``.

    The operator is :class:`~eigensam.hessian.dataset.DatasetHessian` over ``batches`` (with
    ``curvature="ggn"``: :class:`~eigensam.hessian.ggn.GGNOperator`). The
    reference ``(λ₁, v₁)`` is Lanczos (algebraically largest) run to relative residual
    ``reference_tol`` (at most ``reference_iters`` products; its residual and ``converged`` flag
    are reported). For ``t = 0..max_steps`` products the curves give ``|cos(v̂_t, v₁)|``,
    ``Align(v̂_t, v₁)`` (paper §4.3) and the eigenvalue estimate, where ``v̂_t`` is the power
    iterate after ``t`` products (``v̂_0`` the start) or the top Ritz vector of the ``t``-step
    Krylov space. (The power iterate after ``t`` products lies in the ``t + 1``-dimensional Krylov
    space, the Ritz vector in the ``t``-dimensional one, so Lanczos trails by one product at the
    start: with one product its estimate is still the start vector.) Each curve costs
    ``max_steps`` products (:func:`estimates_by_step`).

    Starts: *cold* is a random unit vector (seed ``seed + 1``); *warm* is ``warm_start``:

    - a vector (for example the ``v̂`` an Eigen-SAM checkpoint's tracker holds, which is exactly
      the warm start of its next refresh), or
    - batches: the converged top eigenvector (same rule as the reference) of the Hessian at the
      same weights on those *other* batches. This is our definition of a warm start: Eigen-SAM
      refreshes on a new mini-batch starting from the estimate made on an earlier one.
    - ``None``: warm-start curves are left out.
    """
    check_positive_int("max_steps", max_steps)
    check_positive_int("reference_iters", reference_iters)
    check_tolerance("reference_tol", reference_tol)
    directory = _out_dir(out_dir)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    options = dict(backend=backend, mode=mode, params=params, check=check)
    operator = curvature_operator(model, batches, criterion, curvature, **options)

    def converged_top(op: DatasetHessian | GGNOperator, start_seed: int) -> EigenResult:
        return top_eigenvalues(
            op, 1, num_iters=reference_iters, tol=reference_tol, seed=start_seed
        )[0]

    warm: Tensor | None = None
    warm_kind: str | None = None
    if isinstance(warm_start, Tensor):
        warm = _unit_start(warm_start, operator.dim, operator.dtype, operator.device)
        warm_kind = "vector"
    elif warm_start is not None:
        warm_batches = check_batches(warm_start, "warm_start")
        warm_operator = curvature_operator(model, warm_batches, criterion, curvature, **options)
        with warm_operator as op:
            result, seconds["warm_start"] = _timed(lambda: converged_top(op, seed + 2))
        warm, warm_kind = result.eigenvector, "batches"
        counts["warm_start"] = warm_operator.num_matvecs + _check_matvecs(warm_operator)

    cold = random_unit_vector(
        operator.dim,
        generator=seeded_generator(seed + 1),
        dtype=operator.dtype,
        device=operator.device,
    )
    starts = {"cold": cold}
    if warm is not None:
        starts["warm"] = warm
    solvers: dict[str, Callable[[Tensor], Callable[[MatVec, int], EigenResult]]] = {
        "power": lambda v0: lambda mv, t: power_iteration(mv, v0, t),
        "lanczos": lambda v0: (
            lambda mv, t: lanczos(mv, v0, t, 1, "LA", None, seeded_generator(seed + 3))[0]
        ),
    }
    curves: dict[str, dict[str, dict[str, list[Any]]]] = {}
    with operator as op:
        before = op.num_matvecs
        reference, seconds["reference"] = _timed(lambda: converged_top(op, seed))
        counts["reference"] = op.num_matvecs - before
        v1 = reference.eigenvector
        before = op.num_matvecs
        curve_start = time.perf_counter()
        for method, make_solver in solvers.items():
            curves[method] = {}
            for start_name, v0 in starts.items():
                estimates = estimates_by_step(make_solver(v0), op.matvec, max_steps)
                vectors = [v0] + [r.eigenvector for r in estimates]
                curves[method][start_name] = {
                    "abs_cos": [abs_cosine(v, v1) for v in vectors],
                    "align": [align(v, v1) for v in vectors],
                    "eigenvalue": [None] + [r.eigenvalue for r in estimates],
                    "residual": [None] + [r.residual for r in estimates],
                }
        seconds["curves"] = time.perf_counter() - curve_start
        counts["curves"] = op.num_matvecs - before
    counts["determinism_check"] = _check_matvecs(operator)
    counts["total"] = sum(counts.values())
    seconds["total"] = time.perf_counter() - started
    report: dict[str, Any] = {
        "schema": CONVERGENCE_SCHEMA,
        "label": label,
        "steps": list(range(max_steps + 1)),
        "reference": _eigen_dict(reference),
        "warm_start": {
            "kind": warm_kind,
            "abs_cos_to_reference": None if warm is None else abs_cosine(warm, v1),
        },
        "curves": curves,
        "settings": _settings(
            operator,
            criterion,
            seed,
            max_steps=max_steps,
            reference_iters=reference_iters,
            reference_tol=reference_tol,
        ),
        "num_matvecs": counts,
        "seconds": seconds,
        "files": {"json": "power_convergence.json", "png": "power_convergence.png"},
    }
    _save(directory, "power_convergence", report, _convergence_figure(report))
    return report


def _convergence_figure(report: dict[str, Any]) -> Any:

    figure = Figure(figsize=(9.0, 3.8), dpi=120, layout="constrained")
    steps = report["steps"]
    colors = {"power": "tab:blue", "lanczos": "tab:orange"}
    styles = {"cold": "-", "warm": "--"}
    for index, (key, ylabel) in enumerate([("abs_cos", "|cos(v̂, v₁)|"), ("align", "Align(v̂, v₁)")]):
        axes = figure.add_subplot(1, 2, index + 1)
        for method, by_start in report["curves"].items():
            for start, curve in by_start.items():
                axes.plot(
                    steps,
                    curve[key],
                    color=colors[method],
                    ls=styles[start],
                    marker="o",
                    ms=2.5,
                    label=f"{method}, {start} start",
                )
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("Hessian-vector products")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if index == 0:
            axes.legend(fontsize="small", loc="lower right")
    reference = report["reference"]
    title = (
        f"top eigenvector estimate vs converged v₁ (λ₁ = {reference['eigenvalue']:.4g}, "
        f"rel. residual {reference['relative_residual']:.1e})"
    )
    figure.suptitle(title if report["label"] is None else f"{report['label']}: {title}")
    return figure
