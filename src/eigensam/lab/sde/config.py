"""The configuration of a study (``eigensam sde``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from eigensam.lab.sde.drifts import check_l, check_lr, check_rho


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class SDEConfig:
    """A run of ``eigensam sde``; defaults are the CPU-sized version of the paper's Figure 2
    setting (784-unit GeLU MLP, η = 0.01, ρ = 0.2), :meth:`paper` the full-size one."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_subset: int | None = 4096
    test_subset: int | None = 2000
    model: str = "mlp"
    width: float = 1.0
    batch_size: int = 64
    lr: float = 0.01
    rho: float = 0.2
    steps: int = 300
    track_every: int = 30
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    init_seed: int = 0
    svag_l: int = 4
    lambda_iters: int = 20
    track_batch: int = 256
    figure2: bool = True
    corollary: bool = True
    l_values: tuple[int, ...] = ()
    eta_values: tuple[float, ...] = ()
    eta_horizon: float = 1.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_lr(self.lr)
        check_rho(self.rho)
        check_l(self.svag_l)
        for factor in self.l_values:
            check_l(factor, "l_values")
        for eta in self.eta_values:
            check_lr(eta, "eta_values")
        for name in ("batch_size", "steps", "track_every", "track_batch"):
            _check_positive_int(name, getattr(self, name))
        if self.l_values and not self.figure2:
            raise ValueError("l_values needs figure2=True: its SAM runs are the reference")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if isinstance(self.lambda_iters, bool) or not isinstance(self.lambda_iters, int):
            raise ValueError(f"lambda_iters must be an integer >= 0, got {self.lambda_iters!r}")
        if self.lambda_iters < 0:
            raise ValueError(f"lambda_iters must be >= 0, got {self.lambda_iters}")
        if not (math.isfinite(self.eta_horizon) and self.eta_horizon > 0):
            raise ValueError(f"eta_horizon must be a number > 0, got {self.eta_horizon!r}")

    @classmethod
    def paper(cls, **overrides: Any) -> SDEConfig:
        """Full size: all 60k training images, the full test set, batch 128, T = 10 (1000
        steps), 10 seeds, l = 8."""
        full = dict(
            train_subset=None,
            test_subset=None,
            batch_size=128,
            steps=1000,
            track_every=50,
            seeds=tuple(range(10)),
            svag_l=8,
        )
        return cls(**{**full, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
