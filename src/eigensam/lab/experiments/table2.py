"""Table 2 (paper §6.3): ViT-B-16 fine-tuning from ImageNet-1K weights on CIFAR-10/100.

Not runnable by eigensam: it needs torchvision's pretrained ViT-B-16 weights, CIFAR and a GPU
(4k SAM steps of a 86M-parameter model). The target reports the paper's numbers and why they
are not tested; at paper scale it refuses with that reason instead of training something else.
"""

from __future__ import annotations

from pathlib import Path

from eigensam.lab.experiments.common import Plan, Target, command
from eigensam.lab.experiments.report import Section, not_testable
from eigensam.lab.experiments.runs import Scale

WHY = (
    "needs torchvision's ImageNet-1K ViT-B-16 weights, CIFAR-10/100 and a GPU; eigensam's "
    "small ViT is trained from scratch and is no stand-in for fine-tuning"
)


def plan(scale: Scale) -> Plan:
    if scale.name == "paper":
        raise ValueError(f"table2 (ViT-B-16 fine-tuning) is not implemented: it {WHY}")
    return {}


def analyze(scale: Scale, plan: Plan, out: Path) -> Section:
    claims = [
        not_testable(
            "Eigen-SAM fine-tunes ViT-B-16 better than SAM and SGD",
            "CIFAR-10 98.5 vs 98.4 vs 98.0; CIFAR-100 89.8 vs 89.5 vs 88.6",
            WHY,
        )
    ]
    body = f"Not run: Table 2 {WHY}.\n"
    return Section(
        "table2", "Table 2: ViT-B-16 fine-tuning", command("table2", scale), body, [], claims
    )


TARGET = Target("table2", "Table 2: ViT fine-tuning", plan, analyze, min_seeds=1)
