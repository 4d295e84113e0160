"""The headline (``make main``): SGD with twice the epochs (equal compute, paper Appendix E),
SAM and Eigen-SAM (α = 0.2) at the converged CPU scale: train and test accuracy, final λ₁ and
Align(ε, v₁), mean ± 95% CI over seeds, with the paper's claims about them judged by the
three-way rules of :mod:`~eigensam.lab.experiments.verdicts`. Its runs are Table 1's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from eigensam.lab.experiments.claims import judge
from eigensam.lab.experiments.common import Plan, Results, Target, command
from eigensam.lab.experiments.convergence import CONVERGED_TRAIN_ACC, converged_results
from eigensam.lab.experiments.report import Claim, Section, fmt
from eigensam.lab.experiments.runs import Scale
from eigensam.lab.experiments.targets import decide, fig1, table1

METHODS = ("sgd", "sam", "eigen-sam")
# The accuracy comparisons are the decide target's (more seeds): here their power only.
SPECS = (
    *(dataclasses.replace(spec, decided_by="decide") for spec in decide.SPECS),
    fig1.SAM_FLATTER,
    fig1.EIGEN_FLATTER,
    dataclasses.replace(fig1.EIGEN_ALIGNS, metric="mean_align"),
)


def plan(scale: Scale) -> Plan:
    """Table 1's SGD (twice the epochs), SAM and Eigen-SAM runs, every seed."""
    if scale.name != "cpu":
        raise ValueError("the headline target runs at CPU scale; at paper scale run table1")
    full = table1.plan(scale)
    return {m: full[m] for m in METHODS}


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    results = converged_results(plan, scale.note, out / "headline.json")
    claims = judge(SPECS, results)
    body = (
        f"{scale.note}. Train accuracy: final weights on the whole training subset, "
        "unaugmented. Held-out accuracy: the 10,000 test images and the training images "
        "outside the subset (68,976 at 1,024 training images), the verdicts' measurement; test "
        "accuracy is kept for comparison with the paper. Align(ε, v₁): mean over the run's "
        "measurements on the training batch (for SGD, of the gradient). Mean ± 95% CI over "
        "seeds; SGD trains twice the epochs (equal compute, Appendix E).\n\n"
        + _table(plan, results)
        + f"\n\n{_convergence(results)}\n"
        + results.failure_note()
        + _power(claims, len(scale.seeds))
    )
    title = "Headline: SGD, SAM and Eigen-SAM trained to convergence"
    return Section("headline", title, command("headline", scale), body, [], claims)


def _table(plan: Plan, results: Results) -> str:
    rows = [
        "| method | runs | epochs | train acc (%) | test acc (%) | held-out acc (%) | final λ₁ "
        "| mean Align(ε, v₁) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        rows.append(
            f"| {m} | {len(results.summaries[m])} | {plan[m][0].epochs} | "
            f"{fmt(results.values(m, 'train_fit_acc'), 2, 100)} | "
            f"{fmt(results.values(m, 'test_acc'), 2, 100)} | "
            f"{fmt(results.values(m, 'held_out_acc'), 2, 100)} | "
            f"{fmt(results.values(m, 'final_lambda1'), 2)} | "
            f"{fmt(results.values(m, 'mean_align'), 3)} |"
        )
    return "\n".join(rows)


def _convergence(results: Results) -> str:
    sgd_fit = results.values("sgd", "train_fit_acc")
    met = bool(sgd_fit) and min(sgd_fit) >= CONVERGED_TRAIN_ACC
    return (
        f"Convergence criterion (SGD's train accuracy ≥ {100 * CONVERGED_TRAIN_ACC:.0f}% on "
        f"every seed): {'met' if met else 'NOT met'} (lowest "
        f"{100 * min(sgd_fit) if sgd_fit else float('nan'):.2f}%)."
    )


def _power(claims: list[Claim], seeds: int) -> str:
    power = [
        f"{c.claim}: {c.power.needed} seeds"
        for c in claims
        if c.power is not None and c.power.needed is not None and c.power.needed > c.power.n
    ]
    if not power:
        return ""
    return (
        f"\nPower: `make main`'s budget (10 minutes on 2 cores) holds {seeds} seeds. At the "
        "measured paired SD, detecting the paper's effect with 80% power would need: "
        + "; ".join(power)
        + ". The decide target runs them.\n"
    )


TARGET = Target(
    "headline",
    "Headline at the converged CPU scale",
    plan,
    analyze,
    held_out=True,
    specs=SPECS,
)
