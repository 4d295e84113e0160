"""Eigen-SAM (paper §5.2, Eq. 7-8, Algorithm 2) and the tracker plumbing it shares with X-SAM."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from eigensam.hessian.hvp import Evaluation, unflatten
from eigensam.hessian.tracker import EigenTracker
from eigensam.optim.sam import SAM, check_nonnegative


class TrackedSAM(SAM):
    """SAM plus an :class:`EigenTracker` refreshed every ``eig_interval`` steps on the current
    batch, before the first pass (so the estimate and the step see the same dropout masks).

    ``hvp`` picks the Hessian-vector-product backend (``"fd-forward"``, ``"fd-central"`` or
    ``"autograd"``, see :mod:`eigensam.hessian.hvp`), ``eig_method`` the solver (``"power"`` as in
    the paper, or ``"lanczos"`` for the algebraically largest eigenvalue at the same cost), and
    ``hessian_mode`` whether ``model`` is in train mode (default; the loss being optimized) or
    eval mode (as the official Eigen-SAM code) during the products. Without ``model`` the
    products run in whatever mode the model is in and cannot protect its BatchNorm statistics.

    ``reuse_gradient`` (default True): on a refresh step, the gradient the refresh computed at
    ``w`` on the same batch (same RNG state, same mode, BatchNorm statistics updated once) is the
    step's first pass, bit for bit what the closure would give again, so the closure runs once
    less. It applies when ``model`` is given, ``hessian_mode`` is the mode the model is in
    (train) and the backend evaluates the whole batch at ``w`` (``"autograd"`` with a plain
    closure, ``"fd-forward"``). Pass a :class:`~eigensam.hessian.hvp.SplitClosure` to ``step``
    for memory-lean exact products (see :mod:`eigensam.hessian.hvp`).
    """

    def __init__(
        self,
        params: Iterable[Any] | nn.Module | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        alpha: float = 0.2,
        *,
        eig_interval: int = 100,
        eig_iters: int = 5,
        eig_method: str = "power",
        hvp: str = "autograd",
        hessian_mode: str = "train",
        seed: int = 0,
        reuse_gradient: bool = True,
        **kwargs: Any,
    ):
        self._alpha = check_nonnegative("alpha", alpha)
        super().__init__(params, base_optimizer, rho, **kwargs)
        if hessian_mode not in ("train", "eval"):
            raise ValueError(f"hessian_mode must be 'train' or 'eval', got {hessian_mode!r}")
        if not isinstance(reuse_gradient, bool):
            raise TypeError(f"reuse_gradient must be a bool, got {reuse_gradient!r}")
        self.reuse_gradient = reuse_gradient
        self.tracker = EigenTracker(
            eig_interval, eig_iters, method=eig_method, backend=hvp, mode=hessian_mode, seed=seed
        )
        self._reusable: Evaluation | None = None

    def _extra_defaults(self) -> dict[str, Any]:
        return {"alpha": self._alpha}

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_nonnegative("alpha", group["alpha"])

    def _before_first_pass(self, closure: Callable[[], Tensor], scaler: Any) -> None:
        self._reusable = None
        if self.tracker.due(self.sam_steps):
            self.update_eigenvector(closure, scaler)
            if self.reuse_gradient:
                self._reusable = self.tracker.evaluation
            self.tracker.evaluation = None

    def _first_pass(self, closure: Callable[[], Tensor]) -> Tensor:
        """The refresh's evaluation at ``w`` when there is one (see ``reuse_gradient``), else
        the closure's."""
        reusable, self._reusable = self._reusable, None
        if reusable is None:
            return super()._first_pass(closure)
        return reusable.apply(self._params())

    def update_eigenvector(self, closure: Callable[[], Tensor], scaler: Any = None) -> None:
        """Refresh the top-eigenvector estimate on the closure's batch (manual loops call this
        themselves when ``tracker.due(sam_steps)``). Parameters' ``.grad`` are left as they were.
        A non-finite product (fp16 overflow) keeps the previous estimate, with a warning."""
        scale = 1.0 if scaler is None else float(scaler.get_scale())
        try:
            self.tracker.update(closure, self._params(), self.model, loss_scale=scale)
        except FloatingPointError as error:
            if scaler is None and self.on_nonfinite == "raise":
                raise
            warnings.warn(f"eigenvector update skipped: {error}", RuntimeWarning, stacklevel=2)

    def _group_slices(self) -> Iterable[tuple[dict[str, Any], slice]]:
        """Each param group with the slice of the flat parameter vector it occupies."""
        start = 0
        for group in self.param_groups:
            size = sum(p.numel() for p in group["params"])
            yield group, slice(start, start + size)
            start += size

    def state_dict(self) -> dict[str, Any]:
        """Base optimizer state, step count and the eigenvector estimate (with its RNG)."""
        return {**super().state_dict(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.tracker.load_state_dict(state_dict["tracker"])


class EigenSAM(TrackedSAM):
    """Eigen-SAM: SAM whose perturbation is pulled toward the top Hessian eigenvector ``v̂``.

    ``ε = ρ·(ĝ + α·sign(⟨g, v̂⟩)·v̂⊥)`` with ``ĝ = g/‖g‖`` and ``v̂⊥ = v̂ − ⟨v̂, ĝ⟩ĝ``
    (paper Eq. 7-8; ``v̂⊥`` is not renormalized, as in the paper and its official code;
    ``sign(0)`` is taken as +1). Until the first estimate exists the step is SAM's.
    ``α`` (``alpha``, default 0.2, paper Appendix E) may differ per param group; ``α = 0`` is SAM.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if any(group["adaptive"] for group in self.param_groups):
            raise ValueError("adaptive=True (ASAM) is not defined for EigenSAM; use SAM for ASAM")

    def _ascent_direction(self, grad: Tensor) -> list[Tensor]:
        v = self.tracker.vector
        if v is None:
            return super()._ascent_direction(grad)
        g_hat = grad / grad.norm()
        sign = 1.0 if float(torch.dot(grad, v)) >= 0 else -1.0
        v_perp = v - torch.dot(v, g_hat) * g_hat
        direction = g_hat.clone()
        for group, part in self._group_slices():
            direction[part].add_(v_perp[part], alpha=sign * group["alpha"])
        return unflatten(direction, self._params())
