"""Eigen-SAM (paper §5.2, Eq. 7-8, Algorithm 2)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from eigensam.hessian.closures import AUTO
from eigensam.hessian.estimators import Estimator
from eigensam.optim.sam import check_nonnegative, plain_norm_is_accurate, unit
from eigensam.optim.tracked import TrackedSAM


def auto_alpha(grad_cos: float, target_cos: float) -> float:
    """The smallest ``α ≥ 0`` for which Eigen-SAM's ``ε ∝ ĝ + α·sign(c)·v̂⊥`` (Eq. 8) reaches
    ``cos(ε, v̂) = target_cos``, where ``c = ⟨ĝ, v̂⟩ = grad_cos``.

    With ``a = |c|`` and ``b = √(1 − a²) = ‖v̂⊥‖``, ``ĝ ⊥ v̂⊥`` gives
    ``cos(ε, v̂) = (a + α b²) / √(1 + α² b²)``, increasing in α from ``a`` (α = 0) to 1
    (α = 1/a, where ε ∥ v̂). Solving ``cos = τ`` on that branch:
    ``α = (τ² − a²) / (b·(τ√(1 − τ²) + a·b))``; 0 when ``a ≥ τ`` (already aligned enough).
    """
    a = min(abs(float(grad_cos)), 1.0)
    tau = float(target_cos)
    if a >= tau:
        return 0.0
    b = math.sqrt(1.0 - a * a)
    return (tau * tau - a * a) / (b * (tau * math.sqrt(1.0 - tau * tau) + a * b))


def align_to_cos(target_align: float) -> float:
    """``|cos|`` equivalent to ``Align = 1 − √(2 − 2|cos|)`` (paper §4.3)."""
    return 1.0 - (1.0 - target_align) ** 2 / 2.0


class EigenSAM(TrackedSAM):
    """Eigen-SAM: SAM whose perturbation is pulled toward the top Hessian eigenvector ``v̂``.

    ``ε = ρ·(ĝ + α·sign(⟨g, v̂⟩)·v̂⊥)`` with ``ĝ = g/‖g‖`` and ``v̂⊥ = v̂ − ⟨v̂, ĝ⟩ĝ``
    (paper Eq. 7-8; ``v̂⊥`` is not renormalized, as in the paper and its official code;
    ``sign(0)`` is taken as +1). Until the first estimate exists the step is SAM's.
    ``α`` (``alpha``, default 0.2, paper Appendix E) may differ per param group; ``α = 0`` is SAM.

    ``alpha="auto"`` (the paper's open question, §5.2/§6.4) sets one α per step so that
    ``Align(ε, v̂)`` reaches ``target_align`` (default 0, i.e. ``|cos(ε, v̂)| = ½``): the closed
    form :func:`auto_alpha`, capped at ``alpha_max`` (default 1). The α used last is
    ``last_alpha``.

    The refresh of ``v̂`` (``eig_*``, ``hvp``, ``hessian_mode``, ``hessian_parts``, ``seed``,
    ``reuse_gradient``) is :class:`~eigensam.optim.tracked.TrackedSAM`'s; ``rho``, ``model``,
    ``on_nonfinite``, ``sharpness`` and the base optimizer's keyword arguments are
    :class:`~eigensam.optim.sam.SAM`'s (``adaptive=True`` is refused).
    """

    def __init__(
        self,
        params: Iterable[Any] | nn.Module | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        alpha: float | str = 0.2,
        *,
        target_align: float = 0.0,
        alpha_max: float = 1.0,
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
        if isinstance(target_align, bool) or not isinstance(target_align, int | float):
            raise TypeError(
                f"target_align must be a number in [1 - sqrt(2), 1), got {target_align!r}"
            )
        if not 1 - math.sqrt(2) <= target_align < 1:
            raise ValueError(f"target_align must be in [1 - sqrt(2), 1), got {target_align}")
        self.target_align = float(target_align)
        self.alpha_max = check_nonnegative("alpha_max", alpha_max)
        self.last_alpha: float | None = None
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
        if any(group["adaptive"] for group in self.param_groups):
            raise ValueError("adaptive=True (ASAM) is not defined for EigenSAM; use SAM for ASAM")
        autos = {group["alpha"] == AUTO for group in self.param_groups}
        if len(autos) > 1:
            raise ValueError("alpha='auto' must be used by every param group or by none")

    def _check_alpha(self, alpha: object) -> Any:
        if alpha == AUTO:
            return AUTO
        if isinstance(alpha, str):
            raise ValueError(f"alpha must be a number >= 0 or 'auto', got {alpha!r}")
        return super()._check_alpha(alpha)

    def _mixing(self, along: float) -> list[float]:
        """Per param group ``a = sign(⟨v̂, ĝ⟩)·α`` for ``along = ⟨v̂, ĝ⟩``, so that Eq. 8 reads
        ``ε/ρ = ĝ + a·(v̂ − ⟨v̂, ĝ⟩ĝ) = (1 − a·⟨v̂, ĝ⟩)·ĝ + a·v̂`` (α of the group, or one α from
        ``alpha="auto"``, recorded in ``last_alpha``)."""
        sign = 1.0 if along >= 0 else -1.0
        if self.param_groups[0]["alpha"] == AUTO:
            target = align_to_cos(self.target_align)
            self.last_alpha = min(auto_alpha(along, target), self.alpha_max)
            return [sign * self.last_alpha] * len(self.param_groups)
        return [sign * group["alpha"] for group in self.param_groups]

    def _ascent_direction(self, grad: Tensor) -> list[Tensor]:
        """``ε/ρ`` (Eq. 8) built on ĝ in place; safe for any finite ``g`` (see :func:`unit`)."""
        v = self.tracker.vector
        if v is None:
            return super()._ascent_direction(grad)
        layout = self.layout
        direction = unit(grad, layout)  # ĝ
        along = float(layout.dot(v, direction))
        for a, (_, part) in zip(self._mixing(along), self._group_slices(), strict=True):
            direction[part].mul_(1.0 - a * along).add_(v[part], alpha=a)
        return layout.unflatten(direction)

    def _add_perturbation(self, targets: list[Tensor], grads: Sequence[Tensor | None]) -> None:
        """Eq. 8 added as ``ρ(1 − a⟨v̂, ĝ⟩)/‖g‖ · g + ρa · v̂`` straight from views of the
        gradient and ``v̂`` (no ĝ or direction vector) when the plain norm of ``g`` is accurate;
        else through :meth:`_ascent_direction`."""
        v = self.tracker.vector
        if v is None:
            super()._add_perturbation(targets, grads)
            return
        layout = self.layout
        grad = layout.flatten(grads)
        norm = float(layout.norm(grad))
        if not plain_norm_is_accurate(norm, grad.dtype):
            super()._add_perturbation(targets, grads)
            return
        along = float(layout.dot(v, grad)) / norm
        mixing = self._mixing(along)
        on_grad = [(1 - a * along) / norm for a in mixing]
        self._add_per_group(targets, layout.unflatten(grad), on_grad)
        self._add_per_group(targets, layout.unflatten(v), mixing)
