"""Taylor terms of a loss's gradient along a direction: ``∇f``, ``∇²f·u`` and ``∇³f(u, u)``.

These are the first three terms of the expansion of the perturbed gradient used by the paper's
SDEs (§4.1, Appendix B, Eq. 19): ``∇f(w + ρu) = ∇f + ρ ∇²f u + (ρ²/2) ∇³f(u, u) + O(ρ³)``.
``∇³f(u, u) = ∇_w (uᵀ ∇²f(w) u)`` with ``u`` held fixed, computed exactly by three nested
reverse passes (the gradient's graph, then the graph of ``∇(∇f·u)``, then its gradient).

The guarantees are those of :class:`~eigensam.hessian.hvp.HessianOperator`: the RNG is reset to
its entry state before the closure runs, module buffers, per-module training flags and the
parameters' ``.grad`` are restored afterwards, and ``mode`` selects train or eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from eigensam.hessian.closures import Closure, call_closure
from eigensam.hessian.hvp import (
    FrozenState,
    check_mode,
    flatten,
    graph_building_backward,
    unflatten,
)

Direction = Tensor | Callable[[Tensor], Tensor]


class TaylorTerms(NamedTuple):
    """Flat ``∇f``, ``∇²f·u`` and ``∇³f(u, u)`` (None when not asked for), and the ``u`` used."""

    gradient: Tensor
    hvp: Tensor
    third: Tensor | None
    direction: Tensor


class HigherOrderUnsupportedError(TypeError):
    """The model's loss cannot be differentiated as often as asked (a kernel without double
    backward): a property of the ``model``/closure argument, hence a TypeError."""


def _differentiate(
    outputs: Tensor, inputs: Sequence[Tensor], what: str, keep_graph: bool
) -> list[Tensor | None]:
    """``∇ outputs`` w.r.t. ``inputs`` (with its own graph if ``keep_graph``); autograd's
    refusal to differentiate a kernel again becomes :class:`HigherOrderUnsupportedError`."""
    try:
        grads = torch.autograd.grad(outputs, inputs, create_graph=keep_graph, allow_unused=True)
        if all(g is None for g in grads):
            raise RuntimeError("its graph does not reach the parameters")
        return list(grads)
    except RuntimeError as error:
        raise HigherOrderUnsupportedError(
            f"model: cannot compute {what}, the loss does not support differentiating its "
            "gradient again (a kernel without double backward; third-order terms need a model "
            f"whose kernels are differentiable three times); autograd said: {error}"
        ) from error


def _dot(chunks: Sequence[Tensor | None], u: Sequence[Tensor]) -> Tensor:
    terms = [(c * v).sum() for c, v in zip(chunks, u, strict=True) if c is not None]
    if not terms:
        raise ValueError("the closure's backward() gave no parameter a gradient")
    return torch.stack(terms).sum()


def _check_direction(u: Tensor, dim: int, like: Tensor) -> Tensor:
    if not isinstance(u, Tensor) or u.shape != (dim,):
        shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"u must be a flat tensor of shape ({dim},), got {shape}")
    if not torch.isfinite(u).all():
        raise ValueError("u must be finite")
    return u.detach().to(dtype=like.dtype, device=like.device)


def taylor_terms(
    closure: Closure,
    params: Iterable[Tensor],
    u: Direction,
    model: nn.Module | None = None,
    mode: str | None = "train",
    order: int = 3,
) -> TaylorTerms:
    """Flat ``(∇f, ∇²f·u, ∇³f(u, u))`` of the closure's loss ``f`` at the current parameters.

    ``u`` is a flat direction (length = number of parameters with ``requires_grad``) or a
    function of the flat gradient giving it, e.g. ``lambda g: g / g.norm()`` for the SAM
    direction ``ĝ`` (paper Eq. 2); either way ``u`` is held fixed (not differentiated).
    ``order=2`` skips the third-order term (``third`` is None). ``model`` and ``mode``
    ("train", "eval" or None: as it is) work as for :class:`HessianOperator`.

    A kernel that cannot be differentiated again raises :class:`HigherOrderUnsupportedError`,
    and so does a gradient whose graph does not reach the parameters (what a ``backward``
    marked ``once_differentiable`` leaves). A gradient or Hessian-vector product with no graph
    at all does not depend on the parameters (a linear or quadratic loss): the next term is 0.
    """
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order!r}")
    check_mode(mode)
    if mode == "eval" and model is None:
        raise ValueError("mode='eval' needs model=, the module to put in eval mode")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("params must contain at least one tensor with requires_grad=True")
    dim = sum(p.numel() for p in params)
    if isinstance(u, Tensor):
        _check_direction(u, dim, params[0])
    elif not callable(u):
        raise TypeError(f"u must be a flat tensor or a function of the gradient, got {u!r}")

    frozen = FrozenState(params, model, mode)
    try:
        for p in params:
            p.grad = None
        with graph_building_backward():
            call_closure(closure)
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        if all(g is None for g in grads):
            raise ValueError("the closure's backward() gave no parameter a gradient")
        gradient = flatten(grads, params).detach()
        direction = _check_direction(u if isinstance(u, Tensor) else u(gradient), dim, gradient)
        chunks = unflatten(direction, params)
        if not any(g is not None and g.grad_fn is not None for g in grads):
            hvp = torch.zeros_like(gradient)
            third = torch.zeros_like(gradient) if order == 3 else None
            return TaylorTerms(gradient, hvp, third, direction)
        hv = _differentiate(_dot(grads, chunks), params, "∇²f·u", keep_graph=order == 3)
        hvp = flatten(hv, params).detach()
        third = None
        if order == 3:
            if any(h is not None and h.grad_fn is not None for h in hv):
                third_chunks = _differentiate(_dot(hv, chunks), params, "∇³f(u, u)", False)
                third = flatten(third_chunks, params).detach()
            else:
                third = torch.zeros_like(gradient)
        return TaylorTerms(gradient, hvp, third, direction)
    finally:
        frozen.restore()
