"""The Markdown tables of saved benchmark reports: the one source the docs include.

A benchmark saves its report with :func:`save`: ``benchmarks/results/<name>.json`` (the
machine, the settings, the command line, the seconds it took and one list of rows per table)
and, next to it, the ``.md`` that :func:`render` makes of it. The ``.md`` holds snippet sections
(``machine``, one per table, one per text note, and for the cost reports of
``bench_optimizers.py`` a ``summary``) that the docs include with
``--8<-- "benchmarks/results/FILE.md:SECTION"``, so no figure is typed into a page. A report
names its tables' columns (``columns``: section → key → header, ``formats``: key → format
spec); the cost reports, saved before reports named them, use :data:`COLUMNS`. Re-render saved
reports without measuring again:

    python benchmarks/tables.py benchmarks/results/cost-cpu-time.json [...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

TIME_COLUMNS = {
    "allocator": "CPU allocator",
    "model": "model",
    "method": "method",
    "plain_step_s": "s/step (no refresh)",
    "over_sgd": "over the interval / SGD",
    "over_sam": "/ SAM",
    "refresh_in_sgd_steps": "refresh cost (SGD steps)",
    "overhead": "time outside the closure",
}
MEMORY_COLUMNS = {
    "model": "model",
    "batch_size": "batch",
    "method": "method",
    "peak_mib": "peak growth (MiB)",
    "over_sgd": "/ SGD",
    "over_sam": "/ SAM",
}
HVP_COLUMNS = {
    "model": "model",
    "backend": "backend",
    "hvp_over_grad": "time per product / gradient",
    "peak_mib": "peak growth (MiB)",
    "peak_over_grad": "/ gradient's",
    "max_rel_error": "max rel. error",
    "min_cosine": "min cosine, random v",
    "top_cosine": "cosine along v1",
}
COLUMNS = {"time": TIME_COLUMNS, "memory": MEMORY_COLUMNS, "hvp": HVP_COLUMNS}
DEFAULT_SECTIONS = "time,memory,hvp"


def markdown(
    rows: list[dict[str, Any]], columns: dict[str, str], formats: dict[str, str] | None = None
) -> str:
    """A Markdown table of ``rows``, one column per key of ``columns`` (its header the value); a
    number is written with ``formats[key]`` where the key has one, otherwise a float with
    ``.3g``."""
    formats = formats or {}
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key in columns:
            value = row[key]
            if key in formats and isinstance(value, (int, float)):
                cells.append(format(value, formats[key]))
            else:
                cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# bench_optimizers.py's defaults: a setting that differs is named in the command line.
DEFAULTS = {
    "device": "cpu",
    "batch_size": 128,
    "interval": 100,
    "plain_steps": 6,
    "rounds": 3,
    "hvps": 4,
    "hvp_batch": 256,
    "memory_batches": "simplecnn:16,64,128,256;bn-cnn:128;resnet18:16,64,128",
    "sections": DEFAULT_SECTIONS,
}


def command_line(script: str, settings: dict[str, Any], defaults: dict[str, Any]) -> str:
    """``python benchmarks/SCRIPT`` with the options of ``settings`` that differ from
    ``defaults`` (keys as argparse's destinations)."""
    words = [f"python benchmarks/{script}"]
    for key, default in defaults.items():
        if key in settings and settings[key] != default:
            value = str(settings[key])
            words.append(f"--{key.replace('_', '-')} {value if ';' not in value else repr(value)}")
    return " ".join(words)


def command(settings: dict[str, Any]) -> str:
    """The command line that measured a cost report."""
    return command_line("bench_optimizers.py", settings, DEFAULTS)


def machine(device: str = "cpu", threads: int | str | None = None) -> dict[str, Any]:
    """The machine a report is measured on: CPU model and count, ``threads`` per process (torch's
    setting in this process when None), torch and Python versions, load average now."""
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads() if threads is None else threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "loadavg_start": os.getloadavg(),
    }


def new_report(
    parser: argparse.ArgumentParser, args: argparse.Namespace, **machine_args: Any
) -> dict[str, Any]:
    """A report's header for a benchmark run with ``args``: the machine (see :func:`machine`), the
    settings and the command line (the options that differ from ``parser``'s defaults)."""

    def plain(values: argparse.Namespace) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(values).items()}

    settings = plain(args)
    defaults = {k: v for k, v in plain(parser.parse_args([])).items() if k != "out"}
    return {
        "machine": machine(**machine_args),
        "settings": settings,
        "command": command_line(parser.prog, settings, defaults),
    }


def machine_line(report: dict[str, Any]) -> str:
    """Where and how a report was measured; its wall time where the report has one (a report
    rebuilt from printed tables has none)."""
    m, seconds = report["machine"], report.get("seconds")
    load = f"load average {m['loadavg_start'][0]:.1f} at the start"
    if "loadavg_end" in m:
        load += f", {m['loadavg_end'][0]:.1f} at the end"
    where = m["cpu"] if m["device"] == "cpu" else f"{m['device']} ({m['cpu']})"
    wall = "" if seconds is None else f"; {seconds // 60:.0f} min {seconds % 60:.0f} s of wall time"
    return (
        f"Measured by `{report.get('command') or command(report['settings'])}` on {where} "
        f"({m['cpu_count']} CPUs, torch threads: {m['torch_threads']}), torch {m['torch']}, "
        f"Python {m['python']}; {load}{wall}."
    )


def span(values: Iterable[float], unit: str = "×", decimals: int = 2) -> str:
    """``lo-hi`` of ``values`` (one number when they agree at ``decimals``)."""
    texts = sorted({f"{v:.{decimals}f}" for v in values}, key=float)
    return (texts[0] if len(texts) == 1 else f"{texts[0]}-{texts[-1]}") + unit


def pick(rows: list[dict[str, Any]], keep: Callable[[dict[str, Any]], bool], key: str) -> list:
    return [row[key] for row in rows if keep(row)]


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures the guide pages quote, computed from the report's tables (SimpleCNN, the
    paper's model; ``eigen-sam`` is the paper's rule on the documented
    ``step(closure, batch=...)`` path, ``/whole`` the same with a plain closure and ``/default``
    the library's default rule on the documented path)."""
    rows: list[tuple[str, str]] = []

    def add(label: str, values: list[float], unit: str = "×", decimals: int = 2) -> None:
        if values:
            rows.append((label, span(values, unit, decimals)))

    time = [r for r in report.get("time", []) if r["model"] == "simplecnn"]
    methods = {r["method"] for r in time}
    if {"eigen-sam", "eigen-sam/whole", "sam"} <= methods:
        for method, how in (("eigen-sam", "`batch=`"), ("eigen-sam/whole", "plain closure")):
            ratios = pick(time, lambda r, m=method: r["method"] == m, "over_sam")
            add(f"Eigen-SAM / SAM step time over p = 100, q = 5 ({how})", ratios)
        parts = pick(time, lambda r: r["method"] == "eigen-sam", "refresh_in_sgd_steps")
        whole = pick(time, lambda r: r["method"] == "eigen-sam/whole", "refresh_in_sgd_steps")
        add("refresh of q = 5 products, plain closure", whole, " SGD steps", 1)
        add("refresh of q = 5 products, `batch=` (4 parts)", parts, " SGD steps", 1)
        longer = [100 * (p / w - 1) for p, w in zip(parts, whole, strict=True)]
        add("refresh with `batch=` longer than with a plain closure by", longer, " %", 0)
    if {"eigen-sam/default", "sam"} <= methods:
        default = pick(time, lambda r: r["method"] == "eigen-sam/default", "over_sam")
        refresh = pick(time, lambda r: r["method"] == "eigen-sam/default", "refresh_in_sgd_steps")
        add("Eigen-SAM / SAM step time over p = 40, q = 2, the default (`batch=`)", default)
        add("refresh of q = 2 products, the default, `batch=` (4 parts)", refresh, " SGD steps", 1)
    memory = report.get("memory", [])
    if memory:
        whole = pick(memory, lambda r: r["method"] == "eigen-sam/whole", "over_sam")
        cnn = pick(
            memory,
            lambda r: r["method"] == "eigen-sam/whole" and r["model"] == "simplecnn",
            "over_sam",
        )
        lean = pick(
            memory, lambda r: r["method"] == "eigen-sam" and r["batch_size"] >= 64, "over_sam"
        )
        add("Eigen-SAM / SAM peak memory, plain closure, SimpleCNN", cnn)
        add("Eigen-SAM / SAM peak memory, plain closure, every model", whole)
        add("Eigen-SAM / SAM peak memory, `batch=`, batch ≥ 64, every model", lean)
    hvp = [r for r in report.get("hvp", []) if r["model"] == "simplecnn"]
    exact = pick(hvp, lambda r: r["backend"] == "autograd", "hvp_over_grad")
    add("exact Hessian-vector product, SimpleCNN", exact, " gradient evaluations", 1)
    return rows


def section(name: str, body: str) -> str:
    return f"<!-- --8<-- [start:{name}] -->\n{body}\n<!-- --8<-- [end:{name}] -->\n"


def render(report: dict[str, Any]) -> str:
    """The ``.md`` of a report: machine line, summary (cost reports), each table it holds, then
    its text notes."""
    parts = [
        "<!-- Generated by benchmarks/tables.py from the .json of this name: do not edit. -->\n",
        section("machine", machine_line(report)),
    ]
    columns = report.get("columns", COLUMNS)
    summary = summary_rows(report) if "columns" not in report else []
    if summary:
        table = "\n".join(["| figure | measured |", "|---|---|"])
        table += "".join(f"\n| {label} | {value} |" for label, value in summary)
        parts.append(section("summary", table))
    for name, names in columns.items():
        if name in report:
            parts.append(section(name, markdown(report[name], names, report.get("formats"))))
    for name, text in report.get("notes", {}).items():
        parts.append(section(name, text))
    return "\n".join(parts)


def save(report: dict[str, Any], path: Path) -> Path:
    """Write ``report`` to ``path`` (a ``.json``; the machine's load average now is its
    ``loadavg_end``) and its rendering to the ``.md`` beside it, each atomically."""
    from eigensam.atomic import atomic_write

    report["machine"]["loadavg_end"] = os.getloadavg()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    tables = render(json.loads(text))  # the docs include this file's sections
    atomic_write(path.with_suffix(".md"), lambda f: f.write(tables.encode()))
    return path.with_suffix(".md")


def publish(
    report: dict[str, Any],
    path: Path,
    start: float,
    tables: dict[str, tuple[dict[str, str], list[dict[str, Any]]]],
    formats: dict[str, str],
    notes: dict[str, str],
) -> None:
    """Complete a benchmark's ``report`` (from :func:`new_report`; measured since the
    ``time.perf_counter()`` value ``start``) with its ``tables`` (section → columns, rows), the
    columns' ``formats`` and text ``notes`` (section → text), :func:`save` it to ``path`` and
    print the ``.md``."""
    report["columns"] = {name: columns for name, (columns, _) in tables.items()}
    report.update({name: rows for name, (_, rows) in tables.items()})
    report["formats"], report["notes"] = formats, notes
    report["seconds"] = time.perf_counter() - start
    print(save(report, path).read_text())


def write(path: Path) -> Path:
    """Render the report at ``path`` (a ``.json``) into the ``.md`` beside it."""
    out = path.with_suffix(".md")
    out.write_text(render(json.loads(path.read_text())))
    return out


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(write(Path(name)))
