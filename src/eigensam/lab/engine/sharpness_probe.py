"""Sharpness measured during training: :class:`SharpnessProbe` (λ₁ of a batch loss by Lanczos,
and the alignment of the optimizer's perturbation with v₁) and the perturbation the optimizer
applies."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from eigensam.hessian.closures import SplitClosure
from eigensam.hessian.eigen import lanczos, random_unit_vector
from eigensam.hessian.hvp import HessianOperator
from eigensam.hessian.metrics import abs_cosine, align
from eigensam.optim import EGR, SAM


class SharpnessProbe:
    """λ₁ of a batch loss by Lanczos, and the alignment of the optimizer's perturbation with v₁.

    The Lanczos start is the previous measurement's eigenvector on the same stream of batches
    (warm start): one for the training batches, one per fixed batch; the first start is a random
    unit vector from a private generator seeded with ``seed``. ``reduce`` averages the
    products over the ranks (the global batch's Hessian, see :mod:`eigensam.parallel`).
    """

    def __init__(
        self, iters: int, tol: float, seed: int, reduce: Callable[[Tensor], Tensor] | None = None
    ):
        self.reduce = reduce
        self.iters = iters
        self.tol = tol
        self.generator = torch.Generator().manual_seed(seed)
        self.vector: Tensor | None = None
        self.fixed_vectors: dict[int, Tensor] = {}

    def top_eigenpair(
        self, closure: Callable[[], Tensor], model: nn.Module, stream: int | None = None
    ) -> tuple[dict[str, Any], Tensor, Tensor]:
        """Record of λ₁, its residual ``‖Hv − λv‖`` (absolute and relative to |λ|), convergence
        and number of products; v₁; and the flat gradient, all in train mode. ``stream`` names
        the fixed batch measured (None: the training batch), whose last v₁ is the warm start."""
        params = list(model.parameters())
        operator = HessianOperator(
            closure, params, backend="autograd", model=model, mode="train", reduce=self.reduce
        )
        with operator as op:
            start = self.vector if stream is None else self.fixed_vectors.get(stream)
            if start is None:
                start = random_unit_vector(op.dim, generator=self.generator, dtype=op.dtype)
            top = lanczos(op.matvec, start.to(op.device), self.iters, k=1, which="LA", tol=self.tol)
            grad = op.gradient()
        pair = top[0]
        if stream is None:
            self.vector = pair.eigenvector.detach().cpu()
        else:
            self.fixed_vectors[stream] = pair.eigenvector.detach().cpu()
        relative = pair.residual / abs(pair.eigenvalue) if pair.eigenvalue != 0 else math.inf
        record = {
            "lambda1": pair.eigenvalue,
            "residual": pair.residual,
            "relative_residual": relative,
            "converged": pair.converged,
            "hvps": pair.num_matvecs,
            "grad_norm": float(grad.norm()),
        }
        return record, pair.eigenvector, grad

    def measure(
        self,
        closure: Callable[[], Tensor],
        model: nn.Module,
        optimizer: Optimizer,
        fixed: Sequence[Callable[[], Tensor]] = (),
    ) -> dict[str, Any]:
        """One tracking record for the step the optimizer is about to take on this batch; with
        ``fixed`` closures (fixed batches), also the mean of λ₁, Align and |cos| over them of
        the perturbation the optimizer would apply on each (``fixed_*`` keys). ``closure`` is
        the one the optimizer gets: a :class:`SplitClosure` is measured on its whole batch and
        its parts serve the preview of the optimizer's refresh."""
        whole = closure.closure if isinstance(closure, SplitClosure) else closure
        record, v1, grad = self.top_eigenpair(whole, model)
        eps, tracker = applied_perturbation(optimizer, grad, closure)
        record["align_of"] = "gradient" if eps is grad else "perturbation"
        nonzero = float(eps.norm()) > 0
        record["align"] = align(eps, v1) if nonzero else None
        record["abs_cos"] = abs_cosine(eps, v1) if nonzero else None
        if tracker is not None:
            vector = tracker.vector
            record["opt_eigenvalue"] = tracker.eigenvalue
            record["opt_vector_cos"] = None if vector is None else abs_cosine(vector, v1)
        if fixed:
            values: dict[str, list[float]] = {"lambda1": [], "align": [], "abs_cos": []}
            for stream, fixed_closure in enumerate(fixed):
                pair, v1, grad = self.top_eigenpair(fixed_closure, model, stream)
                eps = perturbation_with(optimizer, tracker, grad)
                values["lambda1"].append(pair["lambda1"])
                if float(eps.norm()) > 0:
                    values["align"].append(align(eps, v1))
                    values["abs_cos"].append(abs_cosine(eps, v1))
            record.update({f"fixed_{key}": mean_or_none(vals) for key, vals in values.items()})
        return record

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "vector": self.vector,
            "fixed_vectors": dict(self.fixed_vectors),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.vector = state["vector"]
        self.fixed_vectors = dict(state.get("fixed_vectors", {}))


def perturbation_with(optimizer: Optimizer, tracker: Any, grad: Tensor) -> Tensor:
    """The perturbation ε the optimizer applies for ``grad`` when its eigenvector tracker is
    ``tracker`` (``grad`` itself for SGD and EGR, which apply none)."""
    if isinstance(optimizer, EGR) or not isinstance(optimizer, SAM):
        return grad
    if tracker is None:
        return optimizer.perturbation(grad)
    saved = optimizer.tracker
    optimizer.tracker = tracker
    try:
        return optimizer.perturbation(grad)
    finally:
        optimizer.tracker = saved


def applied_perturbation(
    optimizer: Optimizer, grad: Tensor, closure: Callable[[], Tensor]
) -> tuple[Tensor, Any]:
    """The perturbation ε the optimizer applies for gradient ``grad`` on this batch (``grad``
    itself for SGD and EGR, which apply none), and the eigenvector tracker it uses, if any.

    When the optimizer's tracker is due for a refresh at this step (Eigen-SAM's ε depends on v̂),
    the refresh is run on a copy of the tracker (same start vector, batch and RNG: the same
    result) and that copy is returned, so the optimizer itself is not touched.
    """
    if isinstance(optimizer, EGR) or not isinstance(optimizer, SAM):
        return grad, None
    tracker = getattr(optimizer, "tracker", None)
    if tracker is not None and tracker.due(optimizer.sam_steps):
        tracker = copy.deepcopy(tracker)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        tracker.update(closure, params, optimizer.model)
    return perturbation_with(optimizer, tracker, grad), tracker


def mean_or_none(values: list[float]) -> float | None:
    """The mean of ``values``, None when there are none."""
    return math.fsum(values) / len(values) if values else None
