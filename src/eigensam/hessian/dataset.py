"""The Hessian of a model's loss over a fixed list of batches (a data set or a fixed subset).

With batches ``(x_i, y_i)`` of ``n_i`` samples (``N = Σ_i n_i``) and ``L_i(w)`` the criterion's
*mean* loss on batch ``i``, the loss is the sample average ``L(w) = Σ_i (n_i/N) L_i(w)``, so

    ``H v = ∇²L(w) v = Σ_i (n_i/N) H_i v``,

the batch-size-weighted average of the per-batch Hessians. Each product reuses
:class:`~eigensam.hessian.hvp.HessianOperator`, so it inherits its backends and its guarantees:
every batch's loss is evaluated from the RNG state the operator had on entry (fixed dropout masks),
BatchNorm buffers are restored, the model is in the requested mode, and on exit the buffers, RNG
state, per-module training flags and ``.grad`` are exactly as they were on entry.

Memory: with one batch and ``backend="autograd"`` the graph of the gradient is built once and kept
for all products (a product is one extra backward pass). With several batches it rebuilds each
batch's graph for every product and frees it before the next batch, so at most one graph is held.
The finite-difference backends hold no graph: one gradient evaluation over all batches is a single
pass that accumulates ``Σ_i (n_i/N) ∇L_i`` (their step ``h`` depends only on ``w`` and ``v``, so the
weighted difference of gradients is the weighted average of the per-batch differences).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from eigensam.hessian.closures import Closure
from eigensam.hessian.eigen import random_unit_vector
from eigensam.hessian.hvp import (
    FrozenState,
    HessianOperator,
    OpenOnParams,
    check_backend,
    check_mode,
)

Batch = tuple[Tensor, Tensor]
Criterion = Callable[[Tensor, Tensor], Tensor]
DEFAULT_CHECK_RTOL = 1e-4


class NondeterministicHessianError(RuntimeError):
    """Two evaluations of ``H v`` for the same ``v`` differ: the operator is not fixed."""


def check_batches(batches: Iterable[Batch], name: str = "batches") -> list[Batch]:
    """``batches`` as a list of ``(inputs, targets)`` tensor pairs with equal, non-zero leading
    sizes; raise naming the offending entry otherwise."""
    if isinstance(batches, Tensor) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{name} must be a sequence of (inputs, targets) tensor pairs, got "
            f"{type(batches).__name__}"
        )
    checked = list(batches)
    if not checked:
        raise ValueError(f"{name} must contain at least one (inputs, targets) batch, got none")
    for i, batch in enumerate(checked):
        if not (
            isinstance(batch, tuple | list)
            and len(batch) == 2
            and all(isinstance(t, Tensor) for t in batch)
        ):
            raise TypeError(
                f"{name}[{i}] must be an (inputs, targets) pair of tensors, got {batch!r:.80}"
            )
        x, y = batch
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(
                f"{name}[{i}] must hold inputs and targets with the same non-zero leading size, "
                f"got shapes {tuple(x.shape)} and {tuple(y.shape)}"
            )
    return [(x, y) for x, y in checked]


def check_criterion(criterion: object) -> Criterion:
    """``criterion`` if it is callable and averages over the batch, else raise."""
    if not callable(criterion):
        raise TypeError(f"criterion must be callable (outputs, targets) -> loss, got {criterion!r}")
    reduction = getattr(criterion, "reduction", "mean")
    if reduction != "mean":
        raise ValueError(
            f"criterion must average over the batch (reduction='mean'), got reduction="
            f"{reduction!r}: the batches are weighted by their sizes n_i/N"
        )
    return criterion


class BatchesLoss(OpenOnParams):
    """The loss ``criterion(model(x), y)`` averaged over fixed ``batches`` with weights
    ``n_i/N``, with the variables ``params`` (default: the model's parameters with
    ``requires_grad``) in the order of the flat vectors: what the operators over a list of batches
    (:class:`DatasetHessian`, :class:`~eigensam.hessian.ggn.GGNOperator`) validate and share."""

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        criterion: Criterion | None,
        mode: str | None,
        params: Iterable[Tensor] | None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.batches = check_batches(batches)
        self.criterion = check_criterion(nn.CrossEntropyLoss() if criterion is None else criterion)
        self.mode = check_mode(mode)
        chosen = list(model.parameters() if params is None else params)
        if not all(isinstance(p, Tensor) for p in chosen):
            raise TypeError("params must be an iterable of tensors")
        self.params = [p for p in chosen if p.requires_grad]
        if not self.params:
            raise ValueError("params must contain at least one tensor with requires_grad=True")
        self.dim = sum(p.numel() for p in self.params)
        self.batch_sizes = [int(x.shape[0]) for x, _ in self.batches]
        self.num_samples = sum(self.batch_sizes)
        self.weights = [n / self.num_samples for n in self.batch_sizes]
        self._frozen: FrozenState | None = None

    def _open(self) -> FrozenState:
        """Save what a loss evaluation may change and put the model in ``mode``."""
        if self._frozen is not None:
            name = type(self).__name__
            raise RuntimeError(f"this {name} is already open; it cannot be nested in itself")
        self._frozen = FrozenState(self.params, self.model, self.mode)
        return self._frozen


class DatasetHessian(BatchesLoss):
    """``v ↦ H v`` for the Hessian of ``criterion(model(x), y)`` averaged over ``batches``
    (``H = Σ_i (n_i/N) H_i``, see the module docstring), as a context manager::

        with DatasetHessian(model, batches, mode="eval") as op:
            hv = op.matvec(v)

    ``batches`` is any iterable of ``(inputs, targets)`` pairs; it is turned into a list once, so
    a shuffling or augmenting loader is sampled once and then fixed. ``criterion`` (default
    ``nn.CrossEntropyLoss()``) must return the batch mean. ``params``
    (default: the model's parameters with ``requires_grad``) fixes the variables and the order of
    the flat vectors. ``backend`` and ``fd_scale`` are those of
    :class:`~eigensam.hessian.hvp.HessianOperator`; ``mode`` is "train", "eval" or None (leave the
    model as it is). Inputs are moved to the parameters' device at every use (no copy if they are
    there already).

    Determinism check: with ``check=True`` the first product of every ``with`` block is computed
    twice from independent evaluations of the loss (for one batch with ``"autograd"``: once on the
    kept graph and once on a freshly built one), and :class:`NondeterministicHessianError` is
    raised when ``‖H v − H' v‖ / ‖H v‖ > check_rtol``: something in the loss draws randomness the
    RNG reset does not cover (a module with a private ``torch.Generator``, random augmentation in
    the forward pass) or changes between calls. :meth:`check_determinism` runs the check on
    request. ``num_matvecs`` counts products returned by :meth:`matvec`, ``num_check_matvecs``
    the extra products spent by checks, ``num_batch_evaluations`` forward/backward passes over
    single batches.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        criterion: Criterion | None = None,
        *,
        backend: str = "autograd",
        mode: str | None = "train",
        params: Iterable[Tensor] | None = None,
        check: bool = True,
        check_rtol: float = DEFAULT_CHECK_RTOL,
        fd_scale: float | None = None,
    ):
        super().__init__(model, batches, criterion, mode, params)
        self.backend = check_backend(backend)
        if not isinstance(check, bool):
            raise TypeError(f"check must be a bool, got {check!r}")
        self.check = check
        self.check_rtol = self._check_rtol(check_rtol)
        self.fd_scale = fd_scale
        # One HessianOperator can stay open over the whole loss unless that would keep the graphs
        # of several batches (autograd with more than one batch).
        self._shared = backend != "autograd" or len(self.batches) == 1
        self._op: HessianOperator | None = None
        self._check_pending = False
        self.num_matvecs = 0
        self.num_check_matvecs = 0
        self.num_batch_evaluations = 0

    @staticmethod
    def _check_rtol(rtol: object) -> float:
        if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not rtol > 0:
            raise ValueError(f"check_rtol must be a number > 0, got {rtol!r}")
        return float(rtol)

    # -- context ---------------------------------------------------------------------------------

    def __enter__(self) -> DatasetHessian:
        frozen = self._open()
        try:
            if self._shared:
                self._op = self._operator(range(len(self.batches))).__enter__()
        except BaseException:
            frozen.restore()
            self._frozen = None
            raise
        self._check_pending = self.check
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._frozen is not None
        try:
            if self._op is not None:
                self._op.__exit__(*exc)
        finally:
            self._op = None
            self._frozen.restore()
            self._frozen = None

    def _require_open(self) -> FrozenState:
        if self._frozen is None:
            raise RuntimeError(
                "DatasetHessian must be used inside `with DatasetHessian(...) as op`"
            )
        return self._frozen

    # -- products --------------------------------------------------------------------------------

    def _closure(self, indices: Sequence[int]) -> Closure:
        """A closure for ``Σ_{i ∈ indices} (n_i/N) L_i``: each batch's loss is evaluated from the
        entry RNG state and back-propagated before the next batch is loaded."""
        frozen = self._require_open()

        def closure() -> Tensor:
            total = None
            for position, i in enumerate(indices):
                if position:
                    frozen.rng.restore()
                x, y = self.batches[i]
                loss = self.criterion(self.model(x.to(self.device)), y.to(self.device))
                if self.weights[i] != 1.0:
                    loss = loss * self.weights[i]
                loss.backward()
                self.num_batch_evaluations += 1
                total = loss.detach() if total is None else total + loss.detach()
            assert total is not None
            return total

        return closure

    def _operator(self, indices: Sequence[int]) -> HessianOperator:
        """A (not yet opened) operator for the batches ``indices``, starting from the entry RNG."""
        self._require_open().rng.restore()
        return HessianOperator(
            self._closure(indices),
            self.params,
            backend=self.backend,
            model=self.model,
            mode=self.mode,
            fd_scale=self.fd_scale,
        )

    def _product(self, v: Tensor, fresh: bool = False) -> Tensor:
        """``H v``. With ``fresh`` the shared operator is closed and reopened first, so the loss
        (and for one batch with ``"autograd"`` its graph) is evaluated anew; the new operator is
        kept for later products. (Closing before reopening matters: a second operator opened
        beside a kept graph would restore buffers that graph saved, invalidating it.)"""
        if self._shared:
            assert self._op is not None
            if fresh:
                self._op.__exit__(None, None, None)
                self._op = None
                self._op = self._operator(range(len(self.batches))).__enter__()
            return self._op.matvec(v)
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for i in range(len(self.batches)):
            with self._operator([i]) as op:
                total += op.matvec(v)
        return total

    def matvec(self, v: Tensor) -> Tensor:
        """``H v = Σ_i (n_i/N) H_i v`` for a flat vector ``v`` of length ``dim``."""
        self._require_open()
        if not isinstance(v, Tensor) or v.shape != (self.dim,):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"v must be a tensor of shape ({self.dim},), got {shape}")
        hv = self._product(v)
        self.num_matvecs += 1
        if self._check_pending:
            self._check_pending = False
            self.num_check_matvecs += 1
            self._compare(hv, self._product(v, fresh=True), self.check_rtol)
        return hv

    __call__ = matvec

    def check_determinism(self, v: Tensor | None = None, rtol: float | None = None) -> float:
        """Compute ``H v`` twice from independent loss evaluations and return
        ``‖H v − H' v‖ / ‖H v‖``; raise :class:`NondeterministicHessianError` above ``rtol``
        (default ``check_rtol``). ``v`` defaults to a fixed random unit vector (seed 0)."""
        self._require_open()
        rtol = self.check_rtol if rtol is None else self._check_rtol(rtol)
        if v is None:
            generator = torch.Generator().manual_seed(0)
            v = random_unit_vector(
                self.dim, generator=generator, dtype=self.dtype, device=self.device
            )
        elif not isinstance(v, Tensor) or v.shape != (self.dim,):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"v must be a tensor of shape ({self.dim},), got {shape}")
        first = self._product(v)
        second = self._product(v, fresh=True)
        self.num_check_matvecs += 2
        self._check_pending = False
        return self._compare(first, second, rtol)

    def _compare(self, first: Tensor, second: Tensor, rtol: float) -> float:
        scale = float(first.double().norm())
        difference = float((first.double() - second.double()).norm())
        relative = difference / scale if scale > 0 else difference
        if not (math.isfinite(relative) and relative <= rtol):
            raise NondeterministicHessianError(
                "the Hessian operator changed between two identical products: "
                f"‖Hv − H'v‖/‖Hv‖ = {relative:.3g} > check_rtol = {rtol:g}. Something in the loss "
                "draws randomness that the RNG reset does not cover (a module with its own "
                "torch.Generator, random augmentation inside the forward pass) or changes between "
                "calls. Make the loss deterministic, use mode='eval' if the randomness is "
                "train-mode only, or pass check=False to accept a changing operator."
            )
        return relative
