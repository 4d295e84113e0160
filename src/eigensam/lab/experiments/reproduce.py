"""``eigensam reproduce TARGET``: plan every run the targets need, check them all before
anything trains, train what is not finished (reusing finished runs and resuming interrupted
ones), then write each target's JSON, figures and report section, and the report."""

from __future__ import annotations

import functools
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eigensam.lab.engine.config import TrainConfig
from eigensam.lab.experiments.common import Plan, Target
from eigensam.lab.experiments.convergence import HELD_OUT_FILE, held_out_fit
from eigensam.lab.experiments.report import Section, fill_headline, write_report
from eigensam.lab.experiments.runs import (
    CPU_DEVIATIONS,
    SideTask,
    check_jobs,
    check_runs,
    execute,
    load_summary,
    make_scale,
)
from eigensam.lab.experiments.targets import (
    datasize,
    decide,
    fig1,
    fig2,
    fig3,
    fig4,
    fig5,
    grid,
    headline,
    lm,
    noise,
    sde_eta,
    stability,
    table1,
    table2,
    table34,
    tracking,
)
from eigensam.lab.workloads.datasets import load_dataset

# In the order ``all`` trains them: the cheapest evidence first, the sweeps last.
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        headline.TARGET,
        decide.TARGET,
        noise.TARGET,
        datasize.TARGET,
        table1.TARGET,
        fig1.TARGET,
        fig4.TARGET,
        table34.TARGET,
        fig3.TARGET,
        fig5.TARGET,
        fig2.TARGET,
        table2.TARGET,
        stability.TARGET,
        tracking.TARGET,
        grid.TARGET,
        sde_eta.TARGET,
        lm.TARGET,
    )
}
REPORT_FILE = "reproduction.md"
VERDICT_RULES = (
    "Verdict rules (`eigensam.lab.experiments.verdicts`), on the 95% interval of the effect "
    "(paired t-test over seeds): *reproduces* when the effect has the paper's sign and the "
    "interval excludes zero; *contradicted* when the interval excludes zero with the opposite "
    "sign, or excludes the paper's effect where the paper gives one; *inconclusive* when the "
    "interval holds zero (and the paper's effect): the data cannot tell them apart; *not "
    "testable on CPU* when the claim needs models, data or hardware this scale lacks. Every "
    "claim states n, the standard deviation SD of its per-seed differences, the minimum "
    "detectable effect at 80% power of a two-sided 5% test, MDE = (t_{0.975,n−1} + "
    "t_{0.8,n−1})·SD/√n (t-approximation; the normal one, 2.80·SD/√n, is smaller), and the "
    "seeds at which the MDE, at that SD, reaches the paper's effect."
)


def resolve_targets(name: str) -> list[Target]:
    """``[TARGETS[name]]``, or every target for ``all``."""
    if name == "all":
        return list(TARGETS.values())
    if name not in TARGETS:
        raise ValueError(f"target must be one of {', '.join([*TARGETS, 'all'])}; got {name!r}")
    return [TARGETS[name]]


def plan_targets(
    targets: Sequence[Target],
    scale_name: str,
    seeds: Sequence[int] | None,
    out: Path,
    overrides: dict[str, Any] | None = None,
    jobs: int = 1,
) -> tuple[Any, dict[str, Plan]]:
    """The scale and every target's plan, validated (``jobs``, seeds, configurations, data
    present, runs already in ``out`` started with the same configuration) before anything
    trains."""
    check_jobs(jobs)
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"out: {out} is a file; give a folder (the runs go in OUT/runs)")
    scale = make_scale(scale_name, out, seeds, overrides)
    for target in targets:
        if len(scale.seeds) < target.min_seeds:
            raise ValueError(
                f"seeds: {target.name} reports 95% confidence intervals over seeds and needs "
                f"at least {target.min_seeds}, got {list(scale.seeds)}"
            )
    plans = {t.name: t.plan(scale) for t in targets}
    configs = check_runs([c for plan in plans.values() for runs in plan.values() for c in runs])
    for key in {(c.dataset, c.data_dir, c.download) for c in configs}:
        load_dataset(key[0], key[1], download=key[2])  # a missing dataset fails here
    return scale, plans


def reproduce(
    target: str,
    scale: str = "cpu",
    seeds: Sequence[int] | None = None,
    out: Path | str | None = None,
    *,
    jobs: int = 1,
    report: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    stop_after: float | None = None,
    readme: Path | str | None = None,
) -> list[Section]:
    """Run ``target`` (or ``all``) at ``scale`` and write ``<out>/<target>/`` (JSON, PNGs)
    and the markdown report (``report``, default ``<out>/reproduction.md``). After
    ``stop_after`` seconds no new run starts: the sections report the runs finished by then
    (and say which are missing). With ``readme``, the decide target's headline table and
    conclusion replace the text between that file's headline markers. Returns the sections."""
    out = Path(out) if out is not None else Path("runs") / f"reproduce-{scale}"
    targets = resolve_targets(target)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    chosen, plans = plan_targets(targets, scale, seeds, out, overrides, jobs)
    configs = check_runs([c for plan in plans.values() for runs in plan.values() for c in runs])
    folders = {t.name: out / t.name for t in targets}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    side = [
        SideTask(
            t.name,
            tuple(c for runs in plans[t.name].values() for c in runs),
            functools.partial(t.analyze, chosen, plans[t.name], folders[t.name]),
        )
        for t in targets
        if t.computes
    ]
    held_out = held_out_tasks(targets, plans) if chosen.name == "cpu" else []
    execute(configs, jobs, [*held_out, *side], stop_after)
    trained = time.perf_counter() - started
    sections = []
    for t in targets:
        sections.append(t.analyze(chosen, plans[t.name], folders[t.name]))
        print(f"{t.name}: report section written", file=sys.stderr, flush=True)
    total, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    path = Path(report) if report is not None else out / REPORT_FILE
    invocation = _invocation(target, chosen, seeds, jobs, stop_after)
    generated = _generated(invocation, total, trained, jobs, run_seconds(configs), cpu)
    write_report(sections, path, header=_header(chosen), order=list(TARGETS), generated=generated)
    headlines = [s.headline for s in sections if s.headline]
    if readme is not None and headlines:
        fill_headline(Path(readme), headlines[0])
        print(f"wrote the headline of {readme}", file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    print(
        f"eigensam reproduce {target}: wall time {_clock(total)}, CPU time {cpu:.0f} s "
        f"(this process and its workers, {jobs} processes at a time)",
        file=sys.stderr,
    )
    return sections


def held_out_tasks(targets: Sequence[Target], plans: dict[str, Plan]) -> list[SideTask]:
    """One side task per run of the ``held_out`` targets not yet evaluated on the held-out
    images, in seed order (each runs as soon as its run is finished)."""
    configs = check_runs(
        [c for t in targets if t.held_out for runs in plans[t.name].values() for c in runs]
    )
    return [
        SideTask(f"held-out {c.run_dir.name}", (c,), functools.partial(held_out_fit, c))
        for c in sorted(configs, key=lambda c: c.seed)
        if not (c.run_dir / HELD_OUT_FILE).is_file()
    ]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished child processes (the
    training workers): the budget unit of ``make main``, independent of how busy the machine
    is."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


def run_seconds(configs: Sequence[TrainConfig]) -> tuple[int, float]:
    """Finished runs among ``configs`` and the sum of their training, tracking and evaluation
    seconds (from their summaries: the cost of the runs, whenever they were trained)."""
    summaries = [load_summary(c) for c in configs]
    done = [s for s in summaries if s.get("status") == "finished"]
    seconds = sum(s["train_seconds"] + s["track_seconds"] + s["eval_seconds"] for s in done)
    return len(done), seconds


def _invocation(
    target: str, scale: Any, seeds: Sequence[int] | None, jobs: int, stop_after: float | None
) -> str:
    """The command line of one invocation (the options that change what it computes)."""
    parts = [f"eigensam reproduce {target} --scale {scale.name}"]
    if seeds is not None:
        parts.append(f"--seeds {','.join(map(str, seeds))}")
    parts.append(f"--jobs {jobs}")
    if stop_after is not None:
        parts.append(f"--stop-after {stop_after / 60:g}")
    return " ".join(parts)


def _generated(
    invocation: str,
    total: float,
    trained: float,
    jobs: int,
    runs: tuple[int, float],
    cpu: float,
) -> str:
    """The note each section written by one invocation carries: its command and cost."""
    return (
        f"Generated by `{invocation}`: wall time {total / 60:.1f} min ({trained / 60:.1f} min "
        f"training and the targets' own computations, {jobs} at a time; {cpu:.0f} "
        "CPU-seconds); finished runs reused from earlier invocations are not retrained. Its "
        f"{runs[0]} runs took "
        f"{runs[1] / 3600:.2f} h of training, tracking and evaluation in all (summed over runs, "
        "from their summaries)."
    )


def _header(scale: Any) -> str:
    """The report page's header: the scale, its deviations from the paper, the verdict rules."""
    lines = [
        "# Reproducing the Eigen-SAM paper with eigensam",
        "",
        "Every number and figure below is generated by the `eigensam reproduce` command that "
        "each section names (nothing is typed in); each target's section is its own file, "
        "rewritten when that target is run again (`eigensam reproduce TARGET --report "
        "docs/reproduction.md`), so one target can be regenerated without the others.",
        "",
        f"**Scale:** {scale.note}.",
        "",
    ]
    if scale.short:
        lines += [f"**Training dynamics (fig1, fig5):** {scale.short_note}.", ""]
    if scale.name == "cpu":
        lines += ["Deviations from the paper's recipe, and why:", ""]
        lines += [f"- {d}" for d in CPU_DEVIATIONS]
        lines.append("")
    lines += [VERDICT_RULES, ""]
    return "\n".join(lines)
