"""Label noise, a regime where sharpness is known to matter (Foret et al. 2021, §3.3: SAM gains
much over SGD when part of the training labels are wrong). SGD (twice the epochs), SAM and
Eigen-SAM (α = 0.2) at the converged CPU scale with symmetric noise on 20% and 40% of the
training subset's labels (:func:`~eigensam.lab.workloads.datasets.flip_labels`, the same flipped
labels for every seed and method), evaluated on clean held-out labels."""

from __future__ import annotations

from pathlib import Path

from eigensam.lab.experiments.claims import POINTS, Compare, Paper, judge
from eigensam.lab.experiments.common import Plan, Target, command, seeds_plan
from eigensam.lab.experiments.convergence import converged_results
from eigensam.lab.experiments.report import Section, fmt
from eigensam.lab.experiments.runs import Scale

NOISE = (0.2, 0.4)
METHODS = ("sgd", "sam", "eigen-sam")
FORET = Paper(None, "Foret et al. 2021, §3.3, CIFAR-10 with label noise", "large gains")
UNTESTED = Paper(None, "not tested by the paper under label noise")


def label(method: str, noise: float) -> str:
    return f"{method} noise={noise:g}"


def specs() -> tuple[Compare, ...]:
    """Per noise level: SAM beats SGD (2× epochs), and Eigen-SAM beats SAM, in clean held-out
    accuracy (directions only: the paper gives no effect for Fashion-MNIST with noise)."""
    return tuple(
        Compare(
            f"{claim} under {noise:.0%} label noise",
            label(a, noise),
            label(b, noise),
            "held_out_acc",
            +1,
            paper,
            **POINTS,
        )
        for noise in NOISE
        for claim, a, b, paper in (
            ("SAM has a higher held-out accuracy than SGD (2× epochs)", "sam", "sgd", FORET),
            ("Eigen-SAM has a higher held-out accuracy than SAM", "eigen-sam", "sam", UNTESTED),
        )
    )


SPECS = specs()


def plan(scale: Scale) -> Plan:
    """Every method and seed at every noise level (SGD: twice the epochs; CPU scale only)."""
    if scale.name != "cpu":
        raise ValueError("the label-noise target runs at CPU scale only")
    epochs = scale.base["epochs"]
    return seeds_plan(
        scale,
        {
            label(m, noise): {
                "method": m,
                "label_noise": noise,
                "epochs": 2 * epochs if m == "sgd" else epochs,
            }
            for noise in NOISE
            for m in METHODS
        },
    )


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    results = converged_results(plan, scale.note, out / "noise.json")
    rows = [
        "| label noise | method | runs | train acc on its noisy labels (%) | test acc (%) | "
        "held-out acc (%) |",
        "|---|---|---|---|---|---|",
    ]
    for group in plan:
        method, noise = group.split(" noise=")
        rows.append(
            f"| {float(noise):.0%} | {method} | {len(results.summaries[group])} | "
            f"{fmt(results.values(group, 'train_fit_acc'), 2, 100)} | "
            f"{fmt(results.values(group, 'test_acc'), 2, 100)} | "
            f"{fmt(results.values(group, 'held_out_acc'), 2, 100)} |"
        )
    body = (
        f"{scale.note}; symmetric label noise: that fraction of the 1,024 training labels "
        "flipped to another class (the same labels for every seed and method); test and "
        "held-out labels clean. Train accuracy is measured on the noisy labels the run trained "
        "on (fitting them means memorizing the noise). Mean ± 95% CI over seeds.\n\n"
        + "\n".join(rows)
        + "\n"
        + results.failure_note()
    )
    claims = judge(SPECS, results)
    title = "Label noise: SGD, SAM and Eigen-SAM with 20% and 40% of the labels flipped"
    return Section("noise", title, command("noise", scale), body, [], claims)


TARGET = Target("noise", "Label noise", plan, analyze, held_out=True, specs=SPECS)
