"""Every shipped YAML config loads and validates; the paper's ones carry Appendix E's values."""

from __future__ import annotations

from pathlib import Path

import pytest

from eigensam.lab.engine.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAPER = {  # dataset: (rho, lr), paper §6.2 and Appendix E
    "cifar10": (0.05, 0.1),
    "cifar100": (0.1, 0.1),
    "fashion-mnist": (0.05, 0.1),
    "svhn": (0.01, 0.01),
}


def test_configs_exist() -> None:
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    for model in ("resnet18", "resnet50", "wrn28-10"):
        for dataset in PAPER:
            assert f"{model}-{dataset}" in names
    assert any(name.startswith("cpu-") for name in names)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_is_valid(path: Path) -> None:
    config = load_config(path)
    if path.stem.startswith("cpu-"):
        assert config.device == "cpu"
        return
    model, _, dataset = path.stem.partition("-")
    if path.stem.startswith("wrn28-10"):
        model, dataset = "wrn28-10", path.stem.removeprefix("wrn28-10-")
    rho, lr = PAPER[dataset]
    assert (config.model, config.dataset, config.method) == (model, dataset, "eigen-sam")
    assert (config.rho, config.lr, config.alpha) == (rho, lr, 0.2)
    assert (config.eig_interval, config.eig_iters, config.batch_size) == (100, 5, 256)
    assert (config.epochs, config.lr_schedule, config.momentum) == (200, "cosine", 0.9)
    assert config.weight_decay == 5e-5
