"""The drifts ``h`` of SGD, SAM and the second- and third-order SDEs, and the SVAG step that
simulates the SDEs (with the checks of η, ρ and l).

``sam``  discrete SAM, Eq. 1, run by :class:`eigensam.optim.SAM` over plain SGD (lr ``η``);
``sgd``  discrete SGD, the reference;
``sde2`` the second-order SDE, Eq. 3, with per-batch drift term ``h₂ = ∇f_γ + ρ ∇²f_γ ĝ_γ``;
``sde3`` the third-order SDE, Eq. 4, with ``h₃ = h₂ + (ρ²/2) ∇³f_γ(ĝ_γ, ĝ_γ)``;

where ``ĝ_γ = ∇f_γ/‖∇f_γ‖`` is held fixed (§4.1). Both SDEs are ``dX = −E_γ[h] dt +
√η Cov_γ[h]^{1/2} dW`` (time ``t = kη``), simulated by SVAG (Li, Malladi & Arora, 2021): ``l``
steps of size ``η/l`` per unit ``η`` of time, each with ``h = c₁ h_{γ₁} + c₂ h_{γ₂}`` from two
independent batches, ``c₁,₂ = ½(1 ± √(2l−1))``. Then ``E h = E_γ h`` and ``Cov h = l·Cov_γ h``,
so ``l`` steps add ``η² Cov_γ h`` to the covariance, as the SDE does over time ``η``; the scheme
converges weakly to the SDE as ``l → ∞``, and ``l = 1`` is the discrete algorithm with drift ``h``.

How the simulated diffusion relates to the paper's Σ (Appendix B, with ``Σ^{a,b}`` the covariance
of the a-th and b-th Taylor terms ``∇f_γ``, ``∇²f_γ ĝ_γ``, ``∇³f_γ(ĝ_γ, ĝ_γ)``):

- ``Cov_γ[h₂] = Σ¹¹ + ρ(Σ¹² + Σ¹²ᵀ) + ρ² Σ²²``: Eq. 3's diffusion plus ``ρ² Σ²²``, a term of
  order ρ² that Eq. 3 drops (it is O(η) for Eq. 3's ``ρ = O(η^{1/2})``);
- ``Cov_γ[h₃] = Σ^SAM + (ρ³/2)(Σ²³ + Σ²³ᵀ) + (ρ⁴/4) Σ³³``: Eq. 4's ``Σ^SAM`` plus terms of order
  ρ³ and ρ⁴, inside Theorem 4.1's ``O(η²ρ³)`` moment error.

The drifts are exactly Eq. 3's and Eq. 4's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from eigensam.hessian.closures import Closure
from eigensam.hessian.hvp import flatten, unflatten
from eigensam.hessian.taylor import taylor_terms
from eigensam.optim import SAM

DRIFTS = ("sgd", "sam", "sde2", "sde3")

# --------------------------------------------------------------------------------------------
# Validation


def check_lr(lr: object, name: str = "lr (η)") -> float:
    """``lr`` (the step size η) as a float if it is a finite real > 0."""
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr):
        raise ValueError(f"{name} must be a finite number > 0, got {lr!r}")
    if lr <= 0:
        raise ValueError(f"{name} must be > 0, got {lr}")
    return float(lr)


def check_rho(rho: object) -> float:
    """``rho`` as a float if it is a finite real ≥ 0."""
    if isinstance(rho, bool) or not isinstance(rho, int | float) or not math.isfinite(rho):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    return float(rho)


def check_l(value: object, name: str = "svag_l") -> int:
    """``value`` (SVAG's time-scale factor l) if it is an int ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} (SVAG factor l) must be an integer >= 1, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# The scheme


def svag_coefficients(svag_l: int) -> tuple[float, float]:
    """``c₁,₂ = ½(1 ± √(2l−1))``: ``c₁ + c₂ = 1`` and ``c₁² + c₂² = l``."""
    root = math.sqrt(2 * check_l(svag_l) - 1)
    return 0.5 * (1 + root), 0.5 * (1 - root)


def _unit(grad: Tensor) -> Tensor:
    norm = grad.norm()
    return grad / norm if float(norm) > 0 else torch.zeros_like(grad)


def make_drift(
    kind: str,
    params: Sequence[Tensor],
    closure_of: Callable[[Any], Closure],
    rho: float,
    model: nn.Module | None = None,
) -> Callable[[Any], Tensor]:
    """``batch ↦ h(batch)`` (flat) at the current parameters, for ``kind`` in :data:`DRIFTS`:
    ``"sgd"`` ``∇f_γ``; ``"sam"`` ``∇f_γ(w + ε)`` with ε from :meth:`SAM.perturbation` (Eq. 1);
    ``"sde2"`` ``∇f_γ + ρ∇²f_γ ĝ_γ`` (Eq. 3); ``"sde3"`` ``+ (ρ²/2)∇³f_γ(ĝ_γ, ĝ_γ)`` (Eq. 4).
    ``closure_of(batch)`` is the torch.optim closure of the batch loss."""
    if kind not in DRIFTS:
        raise ValueError(f"drift kind must be one of {DRIFTS}, got {kind!r}")
    rho = check_rho(rho)
    params = list(params)
    sam = SAM(params, torch.optim.SGD, rho=rho, lr=1.0) if kind == "sam" else None

    def gradient(batch: Any) -> Tensor:
        for p in params:
            p.grad = None
        closure_of(batch)()
        grad = flatten([p.grad for p in params], params).detach()
        for p in params:
            p.grad = None
        return grad

    def drift(batch: Any) -> Tensor:
        if kind == "sgd":
            return gradient(batch)
        if sam is not None:
            eps = sam.perturbation(gradient(batch))
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_add_(params, unflatten(eps, params))
            try:
                return gradient(batch)
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(params, saved)
        order = 3 if kind == "sde3" else 2
        terms = taylor_terms(closure_of(batch), params, _unit, model=model, mode=None, order=order)
        h = terms.gradient + rho * terms.hvp
        if terms.third is not None:
            h = h + 0.5 * rho**2 * terms.third
        return h

    return drift


@torch.no_grad()
def svag_step(
    params: Sequence[Tensor],
    drift: Callable[[Any], Tensor],
    batches: tuple[Any, Any | None],
    lr: float,
    svag_l: int,
) -> None:
    """One SVAG step ``x ← x − (η/l)(c₁ h(γ₁) + c₂ h(γ₂))``; with ``l = 1`` (``c₂ = 0``) the
    second batch is not used and the step is ``x ← x − η h(γ₁)``."""
    c1, c2 = svag_coefficients(svag_l)
    with torch.enable_grad():
        h = drift(batches[0])
        if svag_l > 1:
            if batches[1] is None:
                raise ValueError("SVAG with l > 1 needs a second, independent batch")
            h = c1 * h + c2 * drift(batches[1])
    torch._foreach_add_(list(params), unflatten(h, list(params)), alpha=-lr / svag_l)
