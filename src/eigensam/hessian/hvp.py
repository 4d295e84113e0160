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
the optimizers' ``hvp="auto"`` takes ``"autograd"`` whenever the model supports double backward.
On smooth networks (GeLU, tanh) they agree with the exact product. The finite-difference
backends need only gradients, so they work with any model (kernels without double backward,
mixed precision, DDP where the gradient all-reduce makes the product global); with a model that
cannot be differentiated twice (``torch.compile``, fused kernels such as every
``F.scaled_dot_product_attention`` kernel on CPU) ``"autograd"`` raises
:class:`DoubleBackwardError` naming them, and ``"auto"`` falls back to :data:`FD_FALLBACK`.

Step rule: ``h = fd_scale · (1 + ‖w‖) / ‖v‖`` with ``fd_scale`` defaulting to
``FD_SCALE[backend]``. The fallback (central differences, ``fd_scale = 1e-4``) was chosen on
small causal transformers (``nn.TransformerEncoderLayer``, GeLU, SDPA) in float32 against the
exact product with SDPA's math backend (``benchmarks/bench_fd_transformer.py``, whose tables
docs/cost.md includes): a relative error of about 1e-3 for random directions, along the top
eigenvector and in λ₁; ``fd_scale = 1e-3`` is about 10x more accurate for random directions but
several percent off along the top eigenvector, where the third derivative is large; forward
differences (half the cost) are about 2x less accurate for random directions and 10x less along
the top eigenvector.
In float64 on a smooth MLP the error is 1e-6 (central) and 1e-3 (forward)
(``tests/hessian/test_hvp.py``).

While an operator is open (``with HessianOperator(...) as op:``) every product sees the same loss:
the RNG is reset to the state it had on entry before each closure call (same dropout masks), all
module buffers (BatchNorm running statistics, ``num_batches_tracked``) are restored after each call,
and the model is put in the requested mode. On exit the buffers, RNG state, per-module training
flags and the parameters' ``.grad`` are exactly as they were on entry.

Memory: ``"autograd"`` keeps the graph of the gradient (activations plus the backward pass's saved
tensors) alive while the operator is open, a few times the peak memory of one gradient evaluation
(the HVP table of docs/cost.md). A :class:`SplitClosure` (the batch's loss as a sum of
micro-batch losses) makes it sum the products of the parts instead, ``H v = sum_k (d^2 L_k) v``,
with one part's graph alive at a time: the same product (the Hessian is linear in the loss) at a
fraction of the memory (4 parts: less than one gradient's), the graph rebuilt for every product.
Forward-over-reverse
(``torch.func.jvp`` of ``torch.func.grad``) was measured too and not adopted: it needed more
memory than the retained double-backward graph, and on SimpleCNN no less time
(``benchmarks/bench_optimizers.py``, docs/cost.md).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from eigensam.hessian.closures import Closure, SplitClosure, call_closure
from eigensam.parallel import ParamLayout, is_ddp

BACKENDS = ("autograd", "fd-central", "fd-forward")
# What hvp="auto" uses when the model has no double backward: chosen on a smooth transformer
# (benchmarks/bench_fd_transformer.py; see the module docstring).
FD_FALLBACK = "fd-central"
MODES = ("train", "eval", None)
# Default finite-difference scales; see the module docstring.
FD_SCALE = {"fd-central": 1e-4, "fd-forward": 1e-4}
# What torch says when a model cannot be differentiated twice (torch.compile, fused kernels).
NO_DOUBLE_BACKWARD = ("double backward", "donated buffers", "is not implemented")

# Why the exact backend cannot run on FSDP2's sharded parameters, and what to use instead.
EXACT_UNDER_FSDP2 = (
    "hvp='autograd' (exact double backward) is not available under FSDP2 (fully_shard): the "
    "graph of the gradient uses the gathered parameters, so a second backward does not reach "
    "the sharded ones; use a finite-difference backend: hvp='fd-central' or hvp='fd-forward' "
    f"(hvp='auto' picks {FD_FALLBACK!r})"
)


class DoubleBackwardError(RuntimeError):
    """The exact backend needs double backward, which this model does not support; ``reason``
    is the first line of torch's error."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


def flatten(tensors: Iterable[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Concatenate ``tensors`` into one flat vector; ``None`` entries become zeros shaped as
    the matching entry of ``like``."""
    return torch.cat(
        [
            (t if t is not None else torch.zeros_like(p)).reshape(-1)
            for t, p in zip(tensors, like, strict=True)
        ]
    )


def flatten_releasing(tensors: list[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """:func:`flatten`, emptying the list entry by entry as it is copied: with the list holding
    the only references, one flat vector plus one entry are alive at a time, not two vectors."""
    # The dtype torch.cat in flatten would give: the promotion of every entry's (or zeros').
    dtypes = [p.dtype if t is None else t.dtype for t, p in zip(tensors, like, strict=True)]
    dtype = functools.reduce(torch.promote_types, dtypes)
    out = torch.empty(sum(p.numel() for p in like), dtype=dtype, device=like[0].device)
    for i, view in enumerate(unflatten(out, like)):
        tensor, tensors[i] = tensors[i], None
        if tensor is None:
            view.zero_()
        else:
            view.copy_(tensor)
    return out


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


class OpenOnParams:
    """What the operators on a list of parameters share: their flat vectors take the dtype and
    device of the first parameter, and ``_close`` restores the :class:`FrozenState` saved when
    the operator was opened."""

    params: list[Tensor]
    _frozen: FrozenState | None

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def _close(self) -> None:
        assert self._frozen is not None
        self._frozen.restore()
        self._frozen = None


@dataclass
class Evaluation:
    """What one closure call at ``w`` left behind: the loss, the gradients of ``params`` (those
    requiring gradients), the module buffers after it (one BatchNorm update) and the RNG state
    after it. ``apply`` puts the gradients, buffers and RNG state in place, as if the closure had
    just run; it returns the loss (detached)."""

    loss: Tensor
    params: list[Tensor]
    grads: list[Tensor | None]
    buffers: BufferSnapshot
    rng: RNGSnapshot

    def apply(self) -> Tensor:
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g
        self.buffers.restore()
        self.rng.restore()
        return self.loss


class HessianOperator(OpenOnParams):
    """``H = ∇²L(w)`` of a closure's loss at the current parameters, as ``v ↦ H v`` on flat
    vectors (see the module docstring for backends and the guarantees while it is open).

    ``mode`` ("train", "eval" or None: as it is) applies to ``model``; without ``model`` the loss
    is taken in whatever mode the model is in and its buffers are not protected.
    ``base_grad`` (flat ``∇L(w)``, optional) saves one gradient evaluation for ``"fd-forward"``;
    it must come from the same batch, RNG state and mode. ``num_matvecs`` counts products and
    ``num_closure_calls`` counts loss evaluations.

    With a :class:`SplitClosure` the ``"autograd"`` backend computes each product part by part
    (memory-lean, graph rebuilt per product); it raises ValueError if a BatchNorm layer of
    ``model`` is in train mode during the products, since the parts' batch statistics would
    differ from the whole batch's. The finite-difference backends use the whole-batch closure.

    ``evaluation`` is the :class:`Evaluation` of the first whole-batch closure call at ``w``
    (the graph-building call of ``"autograd"``, ``gradient()`` of ``"fd-forward"``), kept when
    ``model`` is given and every module already was in the requested mode: it is then the first
    pass of an optimizer step on the same batch, and Eigen-SAM reuses it.

    ``reduce`` (optional) is applied to every product :meth:`matvec` returns and to
    :meth:`gradient`: under ``torch.distributed``,
    :class:`~eigensam.parallel.MeanAcrossRanks` makes them those of the global batch
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
        self.layout = ParamLayout(self.params)
        if self.layout.sharded and backend == "autograd":
            raise ValueError(EXACT_UNDER_FSDP2)
        if is_ddp(model):
            raise TypeError(
                "model is a DistributedDataParallel wrapper; pass its .module, run the products "
                "inside eigensam.parallel.local_forward(wrapper) and average them with "
                "reduce=MeanAcrossRanks() (DDP's reducer does not support double backward)"
            )
        self.model = model
        self.mode = check_mode(mode)
        if mode == "eval" and model is None:
            raise ValueError("mode='eval' needs model=, the module to put in eval mode")
        self.fd_scale = FD_SCALE.get(backend) if fd_scale is None else fd_scale
        if self.fd_scale is not None and not self.fd_scale > 0:
            raise ValueError(f"fd_scale must be > 0, got {fd_scale}")
        self.dim = self.layout.numel
        if base_grad is not None and base_grad.shape != (self.dim,):
            raise ValueError(
                f"base_grad must have shape ({self.dim},), got {tuple(base_grad.shape)}"
            )
        self._base_grad = base_grad
        # One part is the whole batch: products then keep its graph (and may be reused).
        split = isinstance(closure, SplitClosure) and len(closure.parts) > 1
        self.parts = cast(SplitClosure, closure).parts if split else None
        self.weights = cast(SplitClosure, closure).weights if split else []
        self._graph_grads: list[Tensor] | None = None
        self._frozen: FrozenState | None = None
        self._record = False
        self.evaluation: Evaluation | None = None
        self.num_matvecs = 0
        self.num_closure_calls = 0

    def __enter__(self) -> HessianOperator:
        self._frozen = FrozenState(self.params, self.model, self.mode)
        modes = self._frozen.modes
        self._record = bool(modes) and all(m.training == was for m, was in modes)
        self.evaluation = None
        if self.parts is not None and self.backend == "autograd":
            batchnorm = [
                name
                for name, m in (self.model.named_modules() if self.model is not None else ())
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
            ]
            if batchnorm:
                self._frozen.restore()
                self._frozen = None
                raise ValueError(
                    f"a SplitClosure with {len(self.parts)} parts changes the batch statistics of "
                    f"BatchNorm layers in train mode ({', '.join(batchnorm)}): use mode='eval' "
                    "or a closure with one part"
                )
        return self

    def __exit__(self, *exc: object) -> None:
        self._graph_grads = None
        self._close()

    def _evaluate(
        self, closure: Closure | None = None, build_graph: bool = False, at_w: bool = False
    ) -> list[Tensor | None]:
        """Gradients of the loss of ``closure`` (default: the whole-batch closure) at the current
        parameters, side effects undone; ``at_w`` marks an evaluation at ``w`` that may be kept
        as ``evaluation``."""
        if self._frozen is None:
            raise RuntimeError("HessianOperator must be used inside `with HessianOperator(...)`")
        self._frozen.rng.restore()
        for p in self.params:
            p.grad = None
        context = graph_building_backward() if build_graph else contextlib.nullcontext()
        with context:
            loss = call_closure(self.closure if closure is None else closure)
        self.num_closure_calls += 1
        grads = [p.grad for p in self.params]
        if at_w and self._record and closure is None and self.evaluation is None:
            self.evaluation = Evaluation(
                loss.detach(),
                self.params,
                [None if g is None else g.detach() for g in grads],
                BufferSnapshot(self.model),
                RNGSnapshot(p.device for p in self.params),
            )
        if not build_graph:  # the graph may hold the buffers: they are restored on exit
            self._frozen.buffers.restore()
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
                # The exact backend's graph holds the gradient already: flattened on demand.
                grads = self._graph_grads or self._evaluate(at_w=True)
                self._base_grad = self.layout.flatten(grads).detach()
        return self._base_grad

    @torch.no_grad()
    def _shifted_gradient(self, v: Tensor, h: float) -> Tensor:
        """Flat ``∇L(w + h v)``; parameters are restored to ``w`` bit for bit."""
        shards = self.layout.locals  # the parameters, or this rank's shards (FSDP2)
        saved = [p.detach().clone() for p in shards]
        torch._foreach_add_(shards, self.layout.unflatten(v), alpha=h)
        try:
            grads = self._evaluate()
        finally:
            torch._foreach_copy_(shards, saved)
        return self.layout.flatten(grads)

    def step_size(self, v: Tensor) -> float:
        """Finite-difference step ``h = fd_scale · (1 + ‖w‖) / ‖v‖``."""
        assert self.fd_scale is not None  # set for the finite-difference backends
        with torch.no_grad():
            w_norm = self.layout.norm_of(self.params)
        return float(self.fd_scale * (1.0 + w_norm) / self.layout.norm(v))

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
                product = self._split_matvec(v) if self.parts else self._exact_matvec(v)
            except RuntimeError as error:
                if not any(marker in str(error) for marker in NO_DOUBLE_BACKWARD):
                    raise
                reason = str(error).splitlines()[0]
                raise DoubleBackwardError(
                    "the exact Hessian-vector product (backend 'autograd') differentiates the "
                    "gradient twice, which this model does not support (torch.compile, fused "
                    f"kernels; torch said: {reason}); use a finite-difference backend: "
                    "hvp='fd-central' or hvp='fd-forward' (or hvp='auto' in the optimizers)",
                    reason,
                ) from error
        else:
            h = self.step_size(v)
            plus = self._shifted_gradient(v, h)
            if self.backend == "fd-forward":
                product = (plus - self._local_gradient()) / h
            else:
                product = (plus - self._shifted_gradient(v, -h)) / (2 * h)
        return product

    def _exact_matvec(self, v: Tensor) -> Tensor:
        """Double backward through the whole batch's gradient graph, kept across products."""
        if self._graph_grads is None:
            self._graph_grads = self._graph_of(self._evaluate(build_graph=True, at_w=True))
        return self._double_backward(self._graph_grads, v, retain_graph=True)

    def _split_matvec(self, v: Tensor) -> Tensor:
        """``sum_k (d^2 L_k) v`` over the SplitClosure's parts, one part's graph at a time."""
        assert self.parts is not None and self._frozen is not None
        product: Tensor | None = None
        for part, weight in zip(self.parts, self.weights, strict=True):
            graph = self._graph_of(self._evaluate(part, build_graph=True))
            hv = self._second_derivatives(graph, v, retain_graph=False)
            if weight != 1.0:
                torch._foreach_mul_([h for h in hv if h is not None], weight)
            del graph
            self._frozen.buffers.restore()
            if product is None:
                product = flatten_releasing(hv, self.params)
            else:  # added in place, parameter by parameter: no flat copy of this part's product
                pairs = zip(unflatten(product, self.params), hv, strict=True)
                reached = [(view, h) for view, h in pairs if h is not None]
                torch._foreach_add_([view for view, _ in reached], [h for _, h in reached])
            del hv  # before the next part's graph is built
        assert product is not None
        return product

    def _graph_of(self, grads: list[Tensor | None]) -> list[Tensor]:
        """The gradients as built with a graph (zeros for parameters the loss does not reach)."""
        if any(g is not None and g.grad_fn is None for g in grads):
            raise RuntimeError("the gradient has no graph: does the loss depend on params?")
        return [
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params, strict=True)
        ]

    def _double_backward(self, graph: list[Tensor], v: Tensor, retain_graph: bool) -> Tensor:
        """Flat ``∇(∇L·v)`` through the gradient ``graph`` (one tensor per parameter)."""
        return flatten_releasing(self._second_derivatives(graph, v, retain_graph), self.params)

    def _second_derivatives(
        self, graph: list[Tensor], v: Tensor, retain_graph: bool
    ) -> list[Tensor | None]:
        """``∇(∇L·v)`` per parameter (None where the loss does not reach it)."""
        pairs = [(g, c) for g, c in zip(graph, unflatten(v, self.params), strict=True) if g.grad_fn]
        dot = sum((g * c).sum() for g, c in pairs)
        return list(
            torch.autograd.grad(
                cast(Tensor, dot), self.params, retain_graph=retain_graph, allow_unused=True
            )
        )

    __call__ = matvec
