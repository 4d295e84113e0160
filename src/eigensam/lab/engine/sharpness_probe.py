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

from eigensam.hessian.closures import AUTO, SplitClosure
from eigensam.hessian.eigen import lanczos, random_unit_vector
from eigensam.hessian.hvp import HessianOperator
from eigensam.hessian.metrics import abs_cosine, align
from eigensam.hessian.tracker import check_tracker_backend, choose_backend
from eigensam.optim import EGR, SAM
from eigensam.parallel import ParamLayout


class SharpnessProbe:
    """λ₁ of a batch loss by Lanczos, and the alignment of the optimizer's perturbation with v₁.

    The Lanczos start is the previous measurement's eigenvector on the same stream of batches
    (warm start): one for the training batches, one per fixed batch; the first start is a random
    unit vector from a private generator seeded with ``seed``. ``reduce`` averages the
    products over the ranks (the global batch's Hessian, see :mod:`eigensam.parallel`).

    ``hvp`` is the product backend: ``"auto"`` (default) is exact double backward, except on an
    FSDP2 model (``fully_shard``), where it is finite differences of FSDP's global gradients
    (:data:`~eigensam.hessian.hvp.FD_FALLBACK`; ``"autograd"`` raises ``ValueError`` there).
    On an FSDP2 model every vector (v₁, the gradient, ε) is this rank's shard, the Lanczos
    basis is sharded and every norm and dot product is global, so λ₁, Align and |cos| equal the
    one process's on the concatenated batch to the finite-difference accuracy (see
    docs/distributed.md); the warm-start vectors are shards too, so :meth:`state_dict` leaves
    them out there (each rank holds a different piece) and :meth:`sharded_state` gives them to
    ``torch.distributed.checkpoint`` instead.
    """

    def __init__(
        self,
        iters: int,
        tol: float,
        seed: int,
        reduce: Callable[[Tensor], Tensor] | None = None,
        hvp: str = AUTO,
    ):
        self.reduce = reduce
        self.hvp = check_tracker_backend(hvp)
        self.sharded = False
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
        backend = choose_backend(self.hvp, params)
        operator = HessianOperator(
            closure, params, backend=backend, model=model, mode="train", reduce=self.reduce
        )
        with operator as op:
            layout = op.layout
            self.sharded = layout.sharded
            start = self.vector if stream is None else self.fixed_vectors.get(stream)
            if start is None:
                whole = random_unit_vector(
                    layout.global_numel, generator=self.generator, dtype=op.dtype
                )
                start = layout.shard(whole.to(op.device))
            start = start.to(op.device)
            top = lanczos(
                op.matvec, start, self.iters, k=1, which="LA", tol=self.tol, algebra=layout
            )
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
            "grad_norm": float(layout.norm(grad)),
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
        layout = ParamLayout([p for p in model.parameters() if p.requires_grad])
        eps, tracker = applied_perturbation(optimizer, grad, closure)
        record["align_of"] = "gradient" if eps is grad else "perturbation"
        nonzero = float(layout.norm(eps)) > 0
        record["align"] = align(eps, v1, layout) if nonzero else None
        record["abs_cos"] = abs_cosine(eps, v1, layout) if nonzero else None
        if tracker is not None:
            vector = tracker.vector
            record["opt_eigenvalue"] = tracker.eigenvalue
            cos = None if vector is None else abs_cosine(vector, v1, layout)
            record["opt_vector_cos"] = cos
        if fixed:
            values: dict[str, list[float]] = {"lambda1": [], "align": [], "abs_cos": []}
            for stream, fixed_closure in enumerate(fixed):
                pair, v1, grad = self.top_eigenpair(fixed_closure, model, stream)
                eps = perturbation_with(optimizer, tracker, grad)
                values["lambda1"].append(pair["lambda1"])
                if float(layout.norm(eps)) > 0:
                    values["align"].append(align(eps, v1, layout))
                    values["abs_cos"].append(abs_cosine(eps, v1, layout))
            record.update({f"fixed_{key}": mean_or_none(vals) for key, vals in values.items()})
        return record

    def sharded_state(self, layout: ParamLayout, streams: int) -> dict[str, Any]:
        """The warm-start vectors of the training batches and of ``streams`` fixed batches as
        ``DTensor`` pieces (each rank's rows) for ``torch.distributed.checkpoint``, zeros where
        there is none yet, with ``present`` flags; load into it in place, then pass it to
        :meth:`load_sharded_state`."""
        vectors = [self.vector, *(self.fixed_vectors.get(i) for i in range(streams))]
        like = layout.locals[0]
        flats = [
            torch.zeros(layout.numel, dtype=like.dtype, device=like.device)
            if v is None
            else v.to(like.device, copy=True)
            for v in vectors
        ]
        return {
            "vectors": [layout.pieces(flat) for flat in flats],
            "present": [v is not None for v in vectors],
        }

    def load_sharded_state(self, state: Mapping[str, Any], layout: ParamLayout) -> None:
        """Take the warm-start vectors from a loaded :meth:`sharded_state`."""
        flats = [layout.from_pieces(pieces).cpu() for pieces in state["vectors"]]
        present = state["present"]
        self.vector = flats[0] if present[0] else None
        self.fixed_vectors = {i: f for i, f in enumerate(flats[1:]) if present[i + 1]}
        self.sharded = True

    def state_dict(self) -> dict[str, Any]:
        """The generator and the warm-start vectors (left out when they are FSDP2 shards: see
        :meth:`sharded_state`)."""
        return {
            "generator": self.generator.get_state(),
            "vector": None if self.sharded else self.vector,
            "fixed_vectors": {} if self.sharded else dict(self.fixed_vectors),
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
