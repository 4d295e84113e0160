"""Hessian-vector products of a training loss, with the operator held fixed.

The loss is given the way ``torch.optim`` gives it: a *closure* that computes the loss, calls
``backward()`` and returns the loss. Three backends compute ``H v`` for ``H = ∇²L(w)``:

``"autograd"``
    exact: the closure runs once with ``create_graph=True`` (its ``backward`` call is made to build
    the graph of the gradient), then each product is a second backward pass ``∇(∇L·v)``.
``"fd-central"``
    ``H v ≈ (∇L(w + h v) − ∇L(w − h v)) / 2h``: two gradient evaluations, error O(h²).
``"fd-forward"``
    ``H v ≈ (∇L(w + h v) − ∇L(w)) / h``: one gradient evaluation (``∇L(w)`` is computed once, or
    passed in), error O(h).

On piecewise-linear networks (ReLU, max-pool) the finite differences cross activation kinks,
so they measure a smoothed Hessian, not the almost-everywhere Hessian that ``"autograd"`` gives:
on the paper's ReLU SimpleCNN their cosine to the exact product is near 0 for random directions
and about 0.96-0.99 along the top eigenvector (``benchmarks/bench_optimizers.py``). That is why
``"autograd"`` is the default of the optimizers. On smooth networks (GeLU, tanh) they agree with
the exact product. The finite-difference backends need only gradients, so they work with any
model (kernels without double backward, mixed precision, DDP where the gradient all-reduce makes
the product global); with a model that cannot be differentiated twice (``torch.compile``, fused
kernels) ``"autograd"`` raises :class:`DoubleBackwardError` naming them.
Step rule: ``h = fd_scale · (1 + ‖w‖) / ‖v‖`` with ``fd_scale`` defaulting to
``FD_SCALE[backend]`` (tested on a smooth MLP: relative error 1e-6 / 1e-3 in float64 for
central / forward differences, ``tests/hessian/test_hvp.py``).

While an operator is open (``with HessianOperator(...) as op:``) every product sees the same loss:
the RNG is reset to the state it had on entry before each closure call (same dropout masks), all
module buffers (BatchNorm running statistics, ``num_batches_tracked``) are restored after each call,
and the model is put in the requested mode. On exit the buffers, RNG state, per-module training
flags and the parameters' ``.grad`` are exactly as they were on entry.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from eigensam.hessian.distributed import is_ddp

Closure = Callable[[], Tensor]
BACKENDS = ("autograd", "fd-central", "fd-forward")
MODES = ("train", "eval", None)
# Default finite-difference scales; see the module docstring and benchmarks/bench_hvp.py.
FD_SCALE = {"fd-central": 1e-3, "fd-forward": 1e-4}
# What torch says when a model cannot be differentiated twice (torch.compile, fused kernels).
NO_DOUBLE_BACKWARD = ("double backward", "donated buffers", "is not implemented")


class DoubleBackwardError(RuntimeError):
    """The exact backend needs double backward, which this model does not support."""


def flatten(tensors: Iterable[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Concatenate ``tensors`` into one flat vector; ``None`` entries become zeros shaped as
    the matching entry of ``like``."""
    return torch.cat(
        [
            (t if t is not None else torch.zeros_like(p)).reshape(-1)
            for t, p in zip(tensors, like, strict=True)
        ]
    )


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped as the tensors of ``like``."""
    sizes = [p.numel() for p in like]
    if vector.numel() != sum(sizes):
        raise ValueError(f"vector has {vector.numel()} entries, parameters have {sum(sizes)}")
    return [chunk.view_as(p) for chunk, p in zip(vector.split(sizes), like, strict=True)]


def check_backend(backend: str) -> str:
    """Return ``backend`` if it names an HVP backend, else raise listing the valid ones."""
    if backend not in BACKENDS:
        raise ValueError(f"hvp backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_mode(mode: str | None) -> str | None:
    """Return ``mode`` if it is 'train', 'eval' or None (leave the model as it is)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def call_closure(closure: Closure) -> Tensor:
    """Run a torch.optim-style closure with gradients enabled; refuse one that returns no loss."""
    with torch.enable_grad():
        loss = closure()
    if not isinstance(loss, Tensor):
        raise TypeError(
            "closure must compute the loss, call loss.backward() and return the loss tensor; "
            f"it returned {type(loss).__name__}"
        )
    return loss


_backward_signature = inspect.signature(torch.Tensor.backward)


@contextlib.contextmanager
def graph_building_backward() -> Iterator[None]:
    """Within this block, ``Tensor.backward`` builds the graph of the gradient
    (``create_graph=True``), so a closure's gradient can be differentiated again."""
    original = torch.Tensor.backward

    def backward(self: Tensor, *args: object, **kwargs: object) -> None:
        bound = _backward_signature.bind(self, *args, **kwargs)
        bound.arguments["create_graph"] = True
        original(*bound.args, **bound.kwargs)

    torch.Tensor.backward = backward  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            # The .grad reference cycle it warns about is broken: the operator resets .grad.
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            yield
    finally:
        torch.Tensor.backward = original  # type: ignore[method-assign]


class BufferSnapshot:
    """Copies of every buffer of ``model`` (BatchNorm running statistics, ``num_batches_tracked``
    and any other registered buffer); ``restore()`` writes them back in place."""

    def __init__(self, model: nn.Module | None):
        self.saved = [] if model is None else [(b, b.detach().clone()) for b in model.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, saved in self.saved:
            buffer.copy_(saved)


class RNGSnapshot:
    """The CPU RNG state and the CUDA RNG state of each device in ``devices``."""

    def __init__(self, devices: Iterable[torch.device] = ()):
        self.cpu = torch.get_rng_state()
        self.cuda = {
            d.index or 0: torch.cuda.get_rng_state(d.index or 0)
            for d in set(devices)
            if d.type == "cuda"
        }

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)


class FrozenState:
    """What a loss evaluation may change, saved: RNG streams, module buffers, module modes and
    parameter gradients; ``restore`` puts everything back."""

    def __init__(self, params: Sequence[Tensor], model: nn.Module | None, mode: str | None):
        self.params = params
        self.grads = [p.grad for p in params]
        self.rng = RNGSnapshot(p.device for p in params)
        self.buffers = BufferSnapshot(model)
        self.modes = [] if model is None else [(m, m.training) for m in model.modules()]
        if model is not None and mode is not None:
            model.train(mode == "train")

    def restore(self) -> None:
        self.rng.restore()
        self.buffers.restore()
        for module, training in self.modes:
            module.training = training
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g


class HessianOperator:
    """``H = ∇²L(w)`` of a closure's loss at the current parameters, as ``v ↦ H v`` on flat
    vectors (see the module docstring for backends and the guarantees while it is open).

    ``mode`` ("train", "eval" or None: as it is) applies to ``model``; without ``model`` the loss
    is taken in whatever mode the model is in and its buffers are not protected.
    ``base_grad`` (flat ``∇L(w)``, optional) saves one gradient evaluation for ``"fd-forward"``;
    it must come from the same batch, RNG state and mode. ``num_matvecs`` counts products and
    ``num_closure_calls`` counts loss evaluations.

    ``reduce`` (optional) is applied to every product :meth:`matvec` returns and to
    :meth:`gradient`: under ``torch.distributed``,
    :class:`~eigensam.hessian.distributed.MeanAcrossRanks` makes them those of the global batch
    loss (the closure then runs this process's shard; ``base_grad`` is this process's gradient).
    """

    def __init__(
        self,
        closure: Closure,
        params: Iterable[Tensor],
        *,
        backend: str = "fd-central",
        model: nn.Module | None = None,
        mode: str | None = "train",
        fd_scale: float | None = None,
        base_grad: Tensor | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ):
        self.closure = closure
        self.reduce = reduce
        self._reduced_grad: Tensor | None = None
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params must contain at least one tensor with requires_grad=True")
        self.backend = check_backend(backend)
        if is_ddp(model):
            raise TypeError(
                "model is a DistributedDataParallel wrapper; pass its .module, run the products "
                "inside eigensam.hessian.distributed.local_forward(wrapper) and average them with "
                "reduce=MeanAcrossRanks() (DDP's reducer does not support double backward)"
            )
        self.model = model
        self.mode = check_mode(mode)
        if mode == "eval" and model is None:
            raise ValueError("mode='eval' needs model=, the module to put in eval mode")
        self.fd_scale = FD_SCALE.get(backend) if fd_scale is None else fd_scale
        if self.fd_scale is not None and not self.fd_scale > 0:
            raise ValueError(f"fd_scale must be > 0, got {fd_scale}")
        self.dim = sum(p.numel() for p in self.params)
        if base_grad is not None and base_grad.shape != (self.dim,):
            raise ValueError(
                f"base_grad must have shape ({self.dim},), got {tuple(base_grad.shape)}"
            )
        self._base_grad = base_grad
        self._graph_grads: list[Tensor] | None = None
        self._frozen: FrozenState | None = None
        self.num_matvecs = 0
        self.num_closure_calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def __enter__(self) -> HessianOperator:
        self._frozen = FrozenState(self.params, self.model, self.mode)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._frozen is not None
        self._graph_grads = None
        self._frozen.restore()
        self._frozen = None

    def _evaluate(self, build_graph: bool = False) -> list[Tensor | None]:
        """Gradients of the closure's loss at the current parameters, side effects undone."""
        if self._frozen is None:
            raise RuntimeError("HessianOperator must be used inside `with HessianOperator(...)`")
        self._frozen.rng.restore()
        for p in self.params:
            p.grad = None
        context = graph_building_backward() if build_graph else contextlib.nullcontext()
        with context:
            call_closure(self.closure)
        self.num_closure_calls += 1
        if not build_graph:  # the graph may hold the buffers: they are restored on exit
            self._frozen.buffers.restore()
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        if all(g is None for g in grads):
            raise ValueError("the closure's backward() gave no parameter a gradient")
        return grads

    def gradient(self) -> Tensor:
        """Flat ``∇L(w)`` (computed once and cached), passed through ``reduce`` when given."""
        if self.reduce is None:
            return self._local_gradient()
        if self._reduced_grad is None:
            self._reduced_grad = self.reduce(self._local_gradient())
        return self._reduced_grad

    def _local_gradient(self) -> Tensor:
        if self._base_grad is None:
            with torch.no_grad():
                self._base_grad = flatten(self._evaluate(), self.params).detach()
        return self._base_grad

    @torch.no_grad()
    def _shifted_gradient(self, v: Tensor, h: float) -> Tensor:
        """Flat ``∇L(w + h v)``; parameters are restored to ``w`` bit for bit."""
        saved = [p.detach().clone() for p in self.params]
        torch._foreach_add_(self.params, unflatten(v, self.params), alpha=h)
        try:
            grads = self._evaluate()
        finally:
            torch._foreach_copy_(self.params, saved)
        return flatten(grads, self.params)

    def step_size(self, v: Tensor) -> float:
        """Finite-difference step ``h = fd_scale · (1 + ‖w‖) / ‖v‖``."""
        with torch.no_grad():
            w_norm = torch.linalg.vector_norm(torch.stack([p.norm() for p in self.params]))
        return float(self.fd_scale * (1.0 + w_norm) / v.norm())

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` of length ``dim`` (passed through ``reduce``)."""
        if v.shape != (self.dim,):
            raise ValueError(f"v must have shape ({self.dim},), got {tuple(v.shape)}")
        self.num_matvecs += 1
        hv = self._local_matvec(v)
        return hv if self.reduce is None else self.reduce(hv)

    def _local_matvec(self, v: Tensor) -> Tensor:
        if self.backend == "autograd":
            try:
                return self._exact_matvec(v)
            except RuntimeError as error:
                if not any(marker in str(error) for marker in NO_DOUBLE_BACKWARD):
                    raise
                raise DoubleBackwardError(
                    "the exact Hessian-vector product (backend 'autograd') differentiates the "
                    "gradient twice, which this model does not support (torch.compile, fused "
                    f"kernels; torch said: {str(error).splitlines()[0]}); use a finite-difference "
                    "backend: hvp='fd-central' or hvp='fd-forward'"
                ) from error
        h = self.step_size(v)
        plus = self._shifted_gradient(v, h)
        if self.backend == "fd-forward":
            return (plus - self._local_gradient()) / h
        return (plus - self._shifted_gradient(v, -h)) / (2 * h)

    def _exact_matvec(self, v: Tensor) -> Tensor:
        if self._graph_grads is None:
            grads = self._evaluate(build_graph=True)
            pairs = [(g, p) for g, p in zip(grads, self.params, strict=True) if g is not None]
            if any(g.grad_fn is None for g, _ in pairs):
                raise RuntimeError("the gradient has no graph: does the loss depend on params?")
            self._graph_grads = [g for g, _ in pairs]
            self._graph_params = [p for _, p in pairs]
            self._base_grad = flatten(grads, self.params).detach()
        chunks = dict(zip(map(id, self.params), unflatten(v, self.params), strict=True))
        dot = sum(
            (g * chunks[id(p)]).sum()
            for g, p in zip(self._graph_grads, self._graph_params, strict=True)
        )
        hv = torch.autograd.grad(
            cast(Tensor, dot), self._graph_params, retain_graph=True, allow_unused=True
        )
        by_param = dict(zip(map(id, self._graph_params), hv, strict=True))
        return flatten([by_param.get(id(p)) for p in self.params], self.params).detach()

    __call__ = matvec
