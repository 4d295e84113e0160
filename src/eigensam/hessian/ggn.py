"""The generalized Gauss-Newton matrix of a loss of the form ``ℓ(f(x; w), y)``.

With ``f`` the model's outputs on a batch, ``J = ∂f/∂w`` their Jacobian and ``H_ℓ = ∂²ℓ/∂f²``
the Hessian of the criterion in the outputs, the Hessian of the loss splits as

    ``∇²L = Jᵀ H_ℓ J + Σ_k (∂ℓ/∂f_k) ∇²f_k``            (Schraudolph 2002; Martens 2020),

and the GGN is its first term, ``G = Jᵀ H_ℓ J``: positive semi-definite when ``ℓ`` is convex
in the outputs (cross-entropy, squared error), equal to the Fisher information when ``ℓ`` is
the negative log-likelihood of an exponential family in its natural parameters (softmax
cross-entropy on logits), and the usual stand-in for the Hessian in large models. Over batches
``(x_i, y_i)`` of ``n_i`` samples it is averaged like the loss, ``G = Σ_i (n_i/N) G_i``.

A product ``G v`` takes three backward passes through the batch's graph and no forward-mode
support:

1. ``J v`` by the double-vjp trick (Townsend 2017): ``u ↦ Jᵀu`` is linear, so the gradient
   of ``⟨Jᵀu, v⟩`` with respect to ``u`` is ``J v`` (one backward pass building ``Jᵀu`` with
   its graph, one through that graph);
2. ``H_ℓ (J v)`` by double backward through the criterion alone (cheap: it acts on outputs);
3. ``Jᵀ (H_ℓ J v)`` by a third backward pass.

The operator holds the same guarantees as :class:`~eigensam.hessian.hvp.HessianOperator`: inside
``with GGNOperator(...) as op`` every forward pass starts from the RNG state on entry (same
dropout masks), buffers are restored after it, the model is in the requested mode, and on exit
buffers, RNG, module modes and ``.grad`` are as they were. With one batch its output graph is kept
for all products; with several, each batch's graph is rebuilt per product, one at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from eigensam.hessian.dataset import Batch, BatchesLoss, Criterion
from eigensam.hessian.hvp import flatten, unflatten


class NotLossOfOutputsError(ValueError):
    """The loss is not of the form ``ℓ(f(x), y)``: the criterion reaches the parameters other
    than through the model's outputs, or the model's output is not a tensor."""


class GGNOperator(BatchesLoss):
    """``v ↦ G v`` for the GGN ``G = Σ_i (n_i/N) J_iᵀ H_ℓ,i J_i`` of ``criterion(model(x), y)``
    over ``batches`` (see the module docstring), as a context manager::

        with GGNOperator(model, batches) as op:
            gv = op.matvec(v)

    ``criterion`` (default ``nn.CrossEntropyLoss()``) is ``ℓ``: a function of the outputs and
    targets only, averaging over the batch. A criterion that also reaches the parameters (a
    weight penalty inside it) raises :class:`NotLossOfOutputsError` at the first product, as does
    a model whose output is not a tensor. ``params`` (default: the model's parameters with
    ``requires_grad``) fixes the variables and the order of the flat vectors; ``mode`` is
    "train", "eval" or None (leave the model as it is). ``num_matvecs`` counts products.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        criterion: Criterion | None = None,
        *,
        mode: str | None = "train",
        params: Iterable[Tensor] | None = None,
    ):
        super().__init__(model, batches, criterion, mode, params)
        self._kept: tuple[Tensor, Tensor, Tensor] | None = None
        self.num_matvecs = 0

    def __enter__(self) -> GGNOperator:
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self._kept = None
        self._close()

    def _outputs(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Batch ``i``'s outputs ``f`` (with their graph to the parameters), a detached copy
        ``f̃`` and ``∂ℓ/∂f̃`` (with its graph to ``f̃``, for ``H_ℓ``), from the entry RNG state;
        buffers are restored after the forward pass."""
        if self._frozen is None:
            raise RuntimeError("GGNOperator must be used inside `with GGNOperator(...) as op`")
        if self._kept is not None:
            return self._kept
        self._frozen.rng.restore()
        x, y = self.batches[i]
        outputs = self.model(x.to(self.device))
        self._frozen.buffers.restore()
        if not isinstance(outputs, Tensor):
            raise NotLossOfOutputsError(
                f"the GGN linearizes the model's output, which must be a tensor; "
                f"{type(self.model).__name__} returned {type(outputs).__name__}"
            )
        free = outputs.detach().requires_grad_()
        loss = self.criterion(free, y.to(self.device))
        reached = torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
        if any(g is not None for g in reached):
            raise NotLossOfOutputsError(
                "the GGN needs a loss of the form ℓ(f(x), y), but the criterion depends on the "
                "parameters other than through the model's outputs (a penalty inside it?); keep "
                "the criterion a function of outputs and targets"
            )
        (loss_grad,) = torch.autograd.grad(loss, free, create_graph=True)
        if len(self.batches) == 1:
            self._kept = (outputs, free, loss_grad)
        return outputs, free, loss_grad

    def _batch_product(self, i: int, v: Tensor) -> list[Tensor | None]:
        """``Jᵢᵀ H_ℓ,i Jᵢ v`` per parameter (None where the outputs do not reach it)."""
        outputs, free, loss_grad = self._outputs(i)
        dummy = torch.zeros_like(outputs, requires_grad=True)
        vjp = torch.autograd.grad(
            outputs, self.params, dummy, create_graph=True, retain_graph=True, allow_unused=True
        )
        chunks = unflatten(v, self.params)
        pairs = [(g, c) for g, c in zip(vjp, chunks, strict=True) if g is not None]
        if not pairs:
            raise ValueError("the model's outputs do not depend on params")
        inner = sum((g * c).sum() for g, c in pairs)
        (jv,) = torch.autograd.grad(cast(Tensor, inner), dummy)
        (hjv,) = torch.autograd.grad(loss_grad, free, jv, retain_graph=True)
        keep = self._kept is not None
        return list(
            torch.autograd.grad(outputs, self.params, hjv, retain_graph=keep, allow_unused=True)
        )

    def matvec(self, v: Tensor) -> Tensor:
        """``G v`` for a flat vector ``v`` of length ``dim``."""
        if not isinstance(v, Tensor) or v.shape != (self.dim,):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"v must be a tensor of shape ({self.dim},), got {shape}")
        total: Tensor | None = None
        for i, weight in enumerate(self.weights):
            product = flatten(self._batch_product(i, v), self.params) * weight
            total = product if total is None else total + product
        self.num_matvecs += 1
        assert total is not None
        return total

    __call__ = matvec
