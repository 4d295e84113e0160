"""The headline's two comparisons with the seeds their power analysis asks for: SAM − SGD (twice
the epochs, equal compute) and Eigen-SAM − SAM (α = 0.2) at the converged CPU scale, judged on
the held-out accuracy (the unused training images and the test set) against the paper's
effects for Fashion-MNIST (+0.5 and +0.2 points, Table 1).

The seeds come from :func:`~eigensam.lab.experiments.verdicts.plan_power` at the paired SDs of
the headline's 5 seeds on the held-out set (:data:`PILOT`); each comparison runs the seeds that
reach 80% power for the paper's effect, at most :data:`MAX_SEEDS`. The runs are the headline's
(same folders) plus the extra seeds, so ``eigensam reproduce decide --stop-after MINUTES`` can
stop anywhere and report the seeds finished: the section states the MDE reached, the seeds that
would reach the paper's effect and their CPU-hours."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from eigensam.lab.experiments.claims import POINTS, Compare, Paper, judge
from eigensam.lab.experiments.common import Plan, Results, Target
from eigensam.lab.experiments.convergence import CONVERGED_TRAIN_ACC, converged_results
from eigensam.lab.experiments.report import Claim, Section, fmt
from eigensam.lab.experiments.runs import Scale
from eigensam.lab.experiments.verdicts import plan_power

# Paired SDs (points) of the headline's 5 seeds on the held-out images, measured by
# `eigensam reproduce headline --scale cpu` (see the section for the figures it gives now).
PILOT = {"sam-sgd": 0.59, "eigen-sam-sam": 0.38}
MAX_SEEDS = 40  # about 40 × 3 runs of 40-50 CPU-seconds: 1.5 CPU-hours
TABLE1_FMNIST = "ResNet-18, Fashion-MNIST, Table 1"
SPECS = (
    Compare(
        "SAM has a higher held-out accuracy than SGD (2× epochs)",
        "sam",
        "sgd",
        "held_out_acc",
        +1,
        Paper(0.5, TABLE1_FMNIST, "95.4 vs 94.9"),
        **POINTS,
    ),
    Compare(
        "Eigen-SAM (α = 0.2) has a higher held-out accuracy than SAM",
        "eigen-sam",
        "sam",
        "held_out_acc",
        +1,
        Paper(0.2, TABLE1_FMNIST, "95.6 vs 95.4"),
        context=(
            Paper(0.9, "ResNet-18, CIFAR-100, §6.4: α = 0.2 against α = 0"),
            Paper(None, "Table 1, other models and datasets", "+0.2 to +0.9"),
        ),
        **POINTS,
    ),
)
PAIRS = {"sam-sgd": SPECS[0], "eigen-sam-sam": SPECS[1]}
METHODS = ("sgd", "sam", "eigen-sam")


def seeds_for(pair: str) -> int:
    """The seeds of one comparison: the t-form seeds for the paper's effect at the pilot SD,
    between 5 (the headline's) and :data:`MAX_SEEDS`."""
    spec = PAIRS[pair]
    needed = plan_power(PILOT[pair], float(spec.paper.effect or 0), 5).needed or MAX_SEEDS
    return min(MAX_SEEDS, max(5, needed))


def plan(scale: Scale) -> Plan:
    """SGD (2× epochs) and SAM for SAM − SGD's seeds, Eigen-SAM and SAM for Eigen-SAM − SAM's:
    the headline's configurations, seeds 0, 1, …"""
    if scale.name != "cpu":
        raise ValueError("the decide target runs at CPU scale; at paper scale run table1")
    n_sgd, n_eig = seeds_for("sam-sgd"), seeds_for("eigen-sam-sam")
    epochs = scale.base["epochs"]
    return {
        "sgd": [scale.config(s, method="sgd", epochs=2 * epochs) for s in range(n_sgd)],
        "sam": [scale.config(s, method="sam") for s in range(max(n_sgd, n_eig))],
        "eigen-sam": [scale.config(s, method="eigen-sam") for s in range(n_eig)],
    }


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    results = converged_results(plan, scale.note, out / "decide.json")
    claims = judge(SPECS, results)
    body = (
        f"{scale.note}. Seeds from the power analysis at the paired SDs of the headline's 5 "
        f"seeds on the held-out images ({_pilot_text()}), at most {MAX_SEEDS}. Mean ± 95% CI "
        "over the seeds finished. Hours to reach the seeds for the paper's effect: the seeds "
        "still missing times the measured training, tracking and evaluation seconds of one "
        "seed's two runs (one thread each; wall time on a shared machine, an upper bound of "
        "their CPU time).\n\n"
        + _methods_table(results, plan)
        + "\n"
        + _power_table(results, claims)
        + results.failure_note()
    )
    return Section(
        "decide",
        "Deciding the headline: SAM − SGD and Eigen-SAM − SAM with powered seeds",
        "eigensam reproduce decide --scale cpu",
        body,
        [],
        claims,
        headline(results, claims),
    )


def headline(results: Results, claims: list[Claim]) -> str:
    """The README's headline: one row per comparison (the paper's effect, the held-out
    difference, its power, the verdict) and one sentence of conclusion, from the claims."""
    rows = [
        "| comparison | paper (Fashion-MNIST, Table 1) | eigensam: held-out accuracy "
        "difference, 95% CI | seeds | MDE (80% power) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for spec, claim in zip(SPECS, claims, strict=True):
        power = claim.power
        n, mde = (power.n, power.mde) if power is not None else (0, None)
        difference = claim.measured.split(" (paired")[0].removeprefix("difference ")
        rows.append(
            f"| {spec.a} − {spec.b} | {spec.paper.effect:+g} points | {difference} | {n} | "
            f"{'–' if mde is None else f'{mde:.2f}'} | **{claim.verdict}** |"
        )
    held_out = results.values("sam", "held_out_images")
    images = f"{int(held_out[0]):,}" if held_out else "the"
    fits = [sum(v) / len(v) for m in METHODS if (v := results.values(m, "train_fit_acc"))]
    fit = f"{100 * min(fits):.1f}-{100 * max(fits):.1f}%" if fits else "–"
    intro = (
        "The paper's 6-layer SimpleCNN on 1,024 Fashion-MNIST images, trained on a CPU to a "
        f"mean train accuracy of {fit} (SGD with twice the epochs), evaluated on {images} "
        "held-out images "
        "(`eigensam reproduce decide`; `make main` runs its first 5 seeds):"
    )
    return (
        textwrap.fill(intro, 100) + "\n\n" + "\n".join(rows) + "\n\n" + _conclusion(claims) + "\n"
    )


def _conclusion(claims: list[Claim]) -> str:
    """One sentence: each comparison's verdict with its interval and the paper's effect."""
    parts = []
    for spec, claim in zip(SPECS, claims, strict=True):
        found = re.search(r"difference ([-+]\d+\.\d+) ± (\d+\.\d+)", claim.measured)
        interval = ""
        if found:
            mean, half = float(found[1]), float(found[2])
            interval = f" ({mean - half:+.2f} to {mean + half:+.2f} points)"
        parts.append(
            f"{spec.a} − {spec.b}{interval} {VERDICT_WORDS.get(claim.verdict, claim.verdict)} "
            f"the paper's {spec.paper.effect:+g}"
        )
    return textwrap.fill("At these seeds, " + "; ".join(parts) + ".", 100)


VERDICT_WORDS = {
    "reproduces": "has the sign of",
    "contradicted": "excludes",
    "inconclusive": "cannot tell 0 from",
}


def _pilot_text() -> str:
    return "; ".join(f"{PAIRS[p].a} − {PAIRS[p].b}: SD {PILOT[p]:.2f} points" for p in PAIRS)


def _methods_table(results: Results, plan: Plan) -> str:
    rows = [
        "| method | runs (planned) | train acc (%) | lowest train acc (%) | test acc (%) "
        "| held-out acc (%) |",
        "|---|---|---|---|---|---|",
    ]
    for m, configs in plan.items():
        fit = results.values(m, "train_fit_acc")
        lowest = f"{100 * min(fit):.2f}" if fit else "–"
        rows.append(
            f"| {m} | {len(results.summaries[m])} ({len(configs)}) | {fmt(fit, 2, 100)} | "
            f"{lowest} | {fmt(results.values(m, 'test_acc'), 2, 100)} | "
            f"{fmt(results.values(m, 'held_out_acc'), 2, 100)} |"
        )
    fits = [v for m in plan for v in results.values(m, "train_fit_acc")]
    met = bool(fits) and min(fits) >= CONVERGED_TRAIN_ACC
    return (
        "\n".join(rows)
        + f"\n\nEvery method's train accuracy ≥ {100 * CONVERGED_TRAIN_ACC:.0f}% on every seed: "
        f"{'met' if met else 'NOT met'}.\n"
    )


def _power_table(results: Results, claims: list[Claim]) -> str:
    """Per comparison: the held-out and test-set differences, the SD and MDE reached, and the
    seeds (and CPU-hours, at the measured seconds of one seed's two runs) for the paper's
    effect."""
    rows = [
        "| comparison | seeds | held-out difference (points) | test-set difference (points) "
        "| paired SD (held-out) | MDE reached | seeds for the paper's effect | hours of one "
        "thread to reach them |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec, claim in zip(SPECS, claims, strict=True):
        a, b = results.paired(spec.a, spec.b, "held_out_acc")
        test_a, test_b = results.paired(spec.a, spec.b, "test_acc")
        held = fmt([x - y for x, y in zip(a, b, strict=True)], 2, 100)
        test = fmt([x - y for x, y in zip(test_a, test_b, strict=True)], 2, 100)
        power = claim.power
        if power is None or power.sd is None or power.mde is None:
            rows.append(f"| {spec.a} − {spec.b} | {len(a)} | {held} | {test} | – | – | – | – |")
            continue
        plan = plan_power(power.sd, float(spec.paper.effect or 0), power.n)
        hours = plan.cpu_hours(_seconds(results, spec.a) + _seconds(results, spec.b))
        rows.append(
            f"| {spec.a} − {spec.b} | {power.n} | {held} | {test} | {power.sd:.2f} | "
            f"{power.mde:.2f} | {plan.needed or '–'} | {'–' if hours is None else f'{hours:.1f}'} |"
        )
    return "\n".join(rows) + "\n"


def _seconds(results: Results, label: str) -> float:
    """Mean training, tracking and evaluation seconds of one of ``label``'s runs."""
    spent = [
        s["train_seconds"] + s["track_seconds"] + s["eval_seconds"]
        for s in results.summaries[label]
    ]
    return sum(spent) / len(spent) if spent else 0.0


TARGET = Target(
    "decide", "Deciding the headline comparisons", plan, analyze, held_out=True, specs=SPECS
)
