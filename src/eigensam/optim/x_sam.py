"""X-SAM: SAM whose descent gradient is corrected along the top Hessian eigenvector (seed 003)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from eigensam.hessian.closures import AUTO
from eigensam.hessian.estimators import Estimator
from eigensam.optim.tracked import TrackedSAM
from eigensam.parallel import local_shard


class XSAM(TrackedSAM):
    """X-SAM: plain SAM ascent; the gradient ``g'`` taken at ``w + ε`` is corrected to
    ``g̃ = g' − α·⟨g', v̂⟩·v̂`` before the base step (``v̂`` unit top-eigenvector estimate).

    ``α`` in [0, 2] (default 1): 0 is SAM, 1 removes the component of ``g'`` along ``v̂``, 2
    reflects it. The correction is invariant to the arbitrary sign of ``v̂``. The public X-SAM
    script instead normalizes ``g'`` and multiplies the correction by a sign that depends on the
    sign of ``v̂`` returned by power iteration, which makes the update depend on an arbitrary
    choice; eigensam implements the sign-invariant form above. Until the first estimate exists
    the step is SAM's. The correction does not depend on ``ρ``: ``ρ = 0`` is the base
    optimizer on the corrected gradient, ``ρ = α = 0`` the base optimizer itself.

    The refresh of ``v̂`` (``eig_*``, ``hvp``, ``hessian_mode``, ``hessian_parts``, ``seed``,
    ``reuse_gradient``) is :class:`~eigensam.optim.tracked.TrackedSAM`'s; the other arguments
    are :class:`~eigensam.optim.sam.SAM`'s.
    """

    def __init__(
        self,
        params: Iterable[Any] | nn.Module | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        alpha: float = 1.0,
        *,
        eig_interval: int | None = None,
        eig_iters: int | None = None,
        eig_method: str | None = None,
        eig_schedule: str | None = None,
        eig_estimator: str | Estimator | None = None,
        hvp: str = AUTO,
        hessian_mode: str = "eval",
        hessian_parts: int | str = AUTO,
        seed: int = 0,
        reuse_gradient: bool = True,
        adaptive: bool = False,
        eta: float = 0.0,
        model: nn.Module | None = None,
        on_nonfinite: str = "raise",
        sharpness: str = "global",
        **base_kwargs: Any,
    ):
        super().__init__(
            params,
            base_optimizer,
            rho,
            alpha,
            eig_interval=eig_interval,
            eig_iters=eig_iters,
            eig_method=eig_method,
            eig_schedule=eig_schedule,
            eig_estimator=eig_estimator,
            hvp=hvp,
            hessian_mode=hessian_mode,
            hessian_parts=hessian_parts,
            seed=seed,
            reuse_gradient=reuse_gradient,
            adaptive=adaptive,
            eta=eta,
            model=model,
            on_nonfinite=on_nonfinite,
            sharpness=sharpness,
            **base_kwargs,
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if not 0 <= group["alpha"] <= 2:
            raise ValueError(f"alpha must be in [0, 2] for XSAM, got {group['alpha']}")

    @torch.no_grad()
    def _correct_descent_gradient(self) -> None:
        v = self.tracker.vector
        if v is None:
            return
        layout = self.layout
        params = layout.params
        grad = layout.flatten([p.grad for p in params])
        # Corrected as m·(u − α⟨u, v̂⟩v̂) with u = g'/m, m = max|g'ᵢ|, so that ⟨g', v̂⟩ cannot
        # overflow the gradient's dtype; a corrected gradient that does is an error. The max-norm
        # is NaN/inf exactly when an entry is.
        scale = layout.amax(grad)
        if not math.isfinite(float(scale)):
            return  # an overflow under a GradScaler: its step() sees it and skips the step
        scale = scale.clamp_min(torch.finfo(grad.dtype).tiny)
        grad.div_(scale)
        along = float(layout.dot(grad, v))
        for group, part in self._group_slices():
            grad[part].add_(v[part], alpha=-group["alpha"] * along)
        grad.mul_(scale)
        if not math.isfinite(float(layout.amax(grad))):
            raise FloatingPointError(
                f"X-SAM's corrected gradient overflows {grad.dtype}; weights were left unchanged"
            )
        # Parameters without a gradient (frozen, unused) stay without one: the base optimizer
        # skips them, as it would without the correction.
        for p, g in zip(params, layout.unflatten(grad), strict=True):
            if p.grad is not None:
                local_shard(p.grad).copy_(g)
