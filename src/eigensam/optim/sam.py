"""SAM and ASAM: the two-pass machinery every sharpness-aware variant in eigensam reuses."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from eigensam.hessian.closures import (
    AUTO,
    Batch,
    Closure,
    batch_size_of,
    batch_split_closure,
    bind_batch,
    call_closure,
    check_hessian_parts,
    hessian_parts_for,
)
from eigensam.hessian.hvp import BufferSnapshot
from eigensam.optim.fsdp2 import SCALER_UNDER_FSDP2, check_fsdp2_options
from eigensam.parallel import (
    MeanAcrossRanks,
    ParamLayout,
    all_ranks_true,
    check_same_across_ranks,
    is_ddp,
    is_fsdp2,
    refuse_fsdp1,
    require_process_group,
    unwrap,
)

NONFINITE_POLICIES = ("raise", "skip")
SHARPNESS = ("global", "local")


def check_nonnegative(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real ≥ 0, else raise naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number >= 0, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def unit(v: Tensor, layout: ParamLayout | None = None) -> Tensor:
    """``v/‖v‖`` for a nonzero finite ``v``, computed as ``u/‖u‖`` with ``u = v/max|vᵢ|`` so the
    squares neither overflow nor underflow (a plain float32/bfloat16 norm is inf for entries
    above ~1e19 and 0 below ~1e-23). With a sharded ``layout`` (FSDP2), ``v`` is this rank's
    part of the vector and the maximum and norm are global."""
    if layout is None or not layout.sharded:
        u = v / v.abs().amax().clamp_min(torch.finfo(v.dtype).tiny)
        return u.div_(u.norm())
    u = v / layout.amax(v).clamp_min(torch.finfo(v.dtype).tiny)
    return u.div_(layout.norm(u))


def plain_norm_is_accurate(norm: float, dtype: torch.dtype) -> bool:
    """Whether a plain 2-norm ``norm`` of a ``dtype`` vector is accurate: its squares neither
    overflowed nor lost entries to underflow (``√tiny·10⁴ ≤ norm ≤ √max·10⁻⁴``; about
    1e-15 to 1e15 in float32 and bfloat16, never in float16)."""
    info = torch.finfo(dtype)
    return math.sqrt(info.tiny) * 1e4 <= norm <= math.sqrt(info.max) * 1e-4


def gradients_finite(layout: ParamLayout, grads: Sequence[Tensor]) -> bool:
    """Whether every entry of ``grads`` (per-parameter gradients of ``layout``'s parameters;
    all ranks' shards under FSDP2) is finite."""
    local = [g for g in layout.local(grads) if g is not None]
    # A finite 2-norm proves every entry finite (one cheap foreach reduction); only when it is
    # not, the max-norm tells NaN/inf entries from finite ones whose squares overflow.
    if math.isfinite(float(layout.norm_of(local))):
        return True
    norms = torch._foreach_norm(local, ord=math.inf)
    return math.isfinite(float(layout.amax(torch.stack(norms))))


class SAM(Optimizer):
    """Sharpness-Aware Minimization (Foret et al., 2021) wrapped around any base optimizer.

    Each step takes the gradient ``g`` at ``w``, moves to ``w + ε`` with ``ε = ρ·g/‖g‖``, takes
    the gradient there, restores ``w`` and lets the base optimizer step with that second gradient
    (paper Eq. 1). With ``adaptive=True`` (ASAM, Kwon et al., 2021) ``ε = ρ·T²g/‖Tg‖`` with
    ``T = |w| + eta`` elementwise. ``ρ = 0`` is exactly the base optimizer.

    ``params`` is an iterable of tensors or parameter groups (each group may set its own ``rho``),
    or an ``nn.Module``, which also sets ``model``: then its trainable parameters
    (``requires_grad``), so that a frozen base model (LoRA adapters, a fine-tuned head) has no
    optimizer state, ``ε`` or ``v̂`` entries. ``base_optimizer`` is an optimizer class
    (built here on the same parameter groups with ``**base_kwargs``) or an instance (then
    ``params`` must be None). ``param_groups`` are shared with the base optimizer, so learning-rate
    schedulers work on either object.

    ``model``, when given, has all its buffers (BatchNorm running statistics and
    ``num_batches_tracked``) restored after the second pass, so only the first pass updates them.

    Under ``DistributedDataParallel`` pass the DDP wrapper as ``model`` (or as ``params``) and
    let the closure call the wrapper. ``sharpness="global"`` (default): DDP all-reduces the
    first-pass gradient, every replica applies the same ``ε``, and ``N`` processes with batch
    ``B`` each run the algorithm of one process with batch ``N·B``. ``sharpness="local"``
    (m-sharpness, Foret et al. 2021 §4.1): the first pass runs under ``no_sync()``, each
    replica perturbs with its own gradient and only the second-pass gradient is averaged. The
    ranks check once, at the first step, that they hold the same optimizer configuration and
    parameter shapes (``ValueError`` otherwise).

    Under FSDP2 (a model sharded by ``torch.distributed.fsdp.fully_shard``, the base optimizer
    on its ``DTensor`` parameters) FSDP's gradients are already the global batch's, ``ε`` is
    computed from the global gradient norm (one all-reduce of one number,
    :class:`~eigensam.parallel.ParamLayout`) and applied shard by shard: ``N``
    processes run the algorithm of one process on the concatenated batch, and every per-step
    buffer (the saved ``w``, ``ε``) is sharded too. ``sharpness="local"`` is refused there
    (``set_requires_gradient_sync(False)`` keeps each rank's gradient unsharded, outside
    ``p.grad``: a per-rank ε would cost a full copy of ``w``). FSDP1
    (``FullyShardedDataParallel``) is refused (``TypeError``).

    ``on_nonfinite``: what to do when the loss or a gradient is NaN/inf without a GradScaler:
    ``"raise"`` (``FloatingPointError``) or ``"skip"`` (warn, leave weights and base state
    untouched). With a GradScaler, overflow skips the step as ``GradScaler.step`` does.
    """

    def __init__(
        self,
        params: Iterable[Any] | nn.Module | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        eta: float = 0.0,
        model: nn.Module | None = None,
        on_nonfinite: str = "raise",
        sharpness: str = "global",
        **base_kwargs: Any,
    ):
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("params is a module and model= names a different module")
            model, params = params, [p for p in params.parameters() if p.requires_grad]
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}"
            )
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
        if sharpness not in SHARPNESS:
            raise ValueError(f"sharpness must be one of {SHARPNESS}, got {sharpness!r}")
        refuse_fsdp1(model)
        if is_fsdp2(model):
            check_fsdp2_options(sharpness=sharpness)
        if sharpness == "local":
            require_process_group("sharpness='local'")
            if not is_ddp(model):
                raise TypeError(
                    "sharpness='local' needs the DistributedDataParallel model (as model= or "
                    "as the first argument), whose no_sync() keeps each replica's first-pass "
                    f"gradient; got model={type(model).__name__}"
                )
        defaults = dict(
            rho=check_nonnegative("rho", rho),
            adaptive=adaptive,
            eta=check_nonnegative("eta", eta),
            **self._extra_defaults(),
        )
        if isinstance(base_optimizer, Optimizer):
            if params is not None:
                raise ValueError("pass params=None when base_optimizer is an optimizer instance")
            if base_kwargs:
                raise ValueError(
                    f"base optimizer keyword arguments {sorted(base_kwargs)} need an optimizer "
                    "class, not an instance"
                )
            super().__init__(base_optimizer.param_groups, defaults)
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if params is None:
                raise ValueError("params is None: give the parameters to optimize")
            super().__init__(params, defaults)
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass or instance, "
                f"got {base_optimizer!r}"
            )
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            self._check_group(group)
        self.defaults.update(self.base_optimizer.defaults)
        self.ddp: DistributedDataParallel | None = model if is_ddp(model) else None
        self.model = unwrap(model)
        self.sharpness = sharpness
        self._layout: ParamLayout | None = None
        # Averages Hessian-vector products over the replicas (Eigen-SAM, X-SAM, EGR); FSDP2's
        # gradients, hence finite-difference products, are global already.
        self.reduce = None if self.ddp is None else MeanAcrossRanks()
        self._ranks_checked = self.ddp is None and not self.layout.sharded
        self.on_nonfinite = on_nonfinite
        self.sam_steps = 0
        self._saved_params: list[Tensor] | None = None
        self._perturbed = False
        self._skipped = False  # a manual loop's first_step() skipped this step
        # Micro-batches of exact Hessian-vector products (variants that take them set these).
        self.hessian_parts: int | str = 1
        self._parts = 1

    def attach_ddp(self, wrapper: DistributedDataParallel) -> None:
        """Use the ``DistributedDataParallel`` ``wrapper`` of the model this optimizer was built
        on as if it had been passed as ``model``: ε from the all-reduced gradient, the rank
        check at the next step, Hessian-vector products on the inner module averaged over the
        ranks. For frameworks that wrap the model after the optimizer exists (the Hugging Face
        ``Trainer``). ``sharpness="local"`` needs the wrapper at construction."""
        if not is_ddp(wrapper):
            raise TypeError(
                f"wrapper must be a DistributedDataParallel module, got {type(wrapper).__name__}"
            )
        if self.model is not None and self.model is not wrapper.module:
            raise ValueError(
                "wrapper wraps a different module than the one this optimizer was built on"
            )
        self.ddp = wrapper
        self.model = wrapper.module
        self.reduce = MeanAcrossRanks()
        self._ranks_checked = False

    def attach_fsdp(self) -> None:
        """Take up the sharded parameters that ``fully_shard`` put in ``param_groups`` after this
        optimizer was built, as if it had been built on the sharded model: the FSDP2 checks, the
        layout over the ranks, the rank check at the next step. For frameworks that shard the
        model after the optimizer exists and swap its parameters in place (Accelerate, the
        Hugging Face ``Trainer`` with ``fsdp=``)."""
        check_fsdp2_options(sharpness=self.sharpness)
        self._layout = None
        if not self.layout.sharded:
            raise ValueError(
                "attach_fsdp: the optimizer's parameters are not FSDP2 shards (DTensor); call it "
                "after fully_shard has replaced them in param_groups"
            )
        self._ranks_checked = False

    # -- hooks for the variants -------------------------------------------------------------

    def _extra_defaults(self) -> dict[str, Any]:
        """Per-group hyperparameters a variant adds to ``rho``, ``adaptive`` and ``eta``."""
        return {}

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("rho", group["rho"])
        check_nonnegative("eta", group["eta"])

    def _ascent_direction(self, grad: Tensor) -> list[Tensor]:
        """Per-parameter ``ε/ρ`` from the flat gradient ``g ≠ 0``: ``ĝ``, or ``T²g/‖Tg‖``
        (flat vectors and the result are this rank's shards under FSDP2)."""
        layout = self.layout
        if not any(group["adaptive"] for group in self.param_groups):
            return layout.unflatten(unit(grad, layout))
        etas = [
            group["eta"] if group["adaptive"] else None
            for group in self.param_groups
            for _ in group["params"]
        ]
        scale = layout.flatten(
            [
                torch.ones_like(p) if eta is None else p.detach().abs() + eta
                for p, eta in zip(layout.locals, etas, strict=True)
            ]
        )
        # T·g/‖T·g‖ = T·ĝ/‖T·ĝ‖: normalizing g first keeps T·g from overflowing.
        return layout.unflatten(scale * unit(scale * unit(grad, layout), layout))

    def _correct_descent_gradient(self) -> None:
        """Change the second-pass gradient in ``p.grad`` before the base step (none for SAM)."""

    def _products_due(self) -> bool:
        """Whether this step takes exact Hessian-vector products on its batch (none for SAM)."""
        return False

    def _product_backend(self) -> str | None:
        """The Hessian-vector-product backend of the variant (None: it takes no products)."""
        return None

    def _set_hessian_parts(self, hessian_parts: int | str, mode: str | None, remedy: str) -> None:
        """Variants with exact products: check ``hessian_parts`` and resolve it for ``model``
        with the products in ``mode`` (an explicit number > 1 with BatchNorm in train mode
        raises, suggesting ``remedy``)."""
        self.hessian_parts = check_hessian_parts(hessian_parts)
        self._parts = hessian_parts_for(hessian_parts, self.model, mode, remedy=remedy)

    def split_count(self, batch_size: int) -> int:
        """How many micro-batches ``step(closure, batch=)`` splits a batch of ``batch_size``
        samples into for this optimizer's exact Hessian-vector products: 1 without products
        (SAM), with finite-difference products (they use the whole batch; ``hvp="auto"``
        under FSDP2) or ``hessian_parts=1``; else ``hessian_parts`` (``"auto"`` resolved when
        the optimizer was built), at most one per sample."""
        backend = self._product_backend()
        exact = backend == "autograd" or (backend == AUTO and not self.layout.sharded)
        return min(self._parts, batch_size) if exact else 1

    def bind(self, closure: Callable[..., Tensor], batch: Batch | None = None) -> Closure:
        """The zero-argument closure ``step(closure, batch=batch)`` runs at this step: the
        closure applied to the batch (``closure(*batch)``, a dict: ``closure(**batch)``), on a
        step with exact products a :class:`~eigensam.hessian.closures.SplitClosure` of
        :meth:`split_count` micro-batches; ``closure`` itself without a batch. For code that
        previews a step on the same batch (a sharpness probe)."""
        if batch is None:
            if isinstance(self.hessian_parts, int) and self.hessian_parts > 1:
                raise ValueError(
                    f"hessian_parts={self.hessian_parts} splits the batch, so step() needs it: "
                    "step(closure, batch=(x, y)) with a closure that takes the batch's tensors"
                )
            return closure
        parts = self.split_count(batch_size_of(batch))
        if parts == 1 or not self._products_due():
            return bind_batch(closure, batch)
        return batch_split_closure(closure, batch, parts)

    def _before_first_pass(self, closure: Callable[[], Tensor], scaler: Any) -> None:
        """Work done at the start of ``step`` before the first pass (none for SAM)."""

    def _first_pass(self, closure: Callable[[], Tensor]) -> Tensor:
        """Fill ``p.grad`` with the gradient at ``w`` (gradients are already zeroed) and return
        the loss. With ``sharpness="local"`` it runs under DDP's ``no_sync()`` (this replica's
        gradient); Eigen-SAM may reuse the gradient its eigenvector refresh computed."""
        if self.sharpness == "local":
            assert self.ddp is not None
            with self.ddp.no_sync():
                return call_closure(closure)
        return call_closure(closure)

    def _second_pass(self, closure: Callable[[], Tensor]) -> None:
        """Fill ``p.grad`` with the gradient at ``w + ε``; module buffers (BatchNorm statistics)
        are left as the first pass made them."""
        buffers = BufferSnapshot(self.model)
        call_closure(closure)
        buffers.restore()

    # -- the two passes -----------------------------------------------------------------------

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def layout(self) -> ParamLayout:
        """How the parameters lie over the ranks (:class:`ParamLayout`: replicated, or FSDP2
        shards); rebuilt when the parameters change (``add_param_group``)."""
        params = self._params()
        if self._layout is None or len(self._layout.params) != len(params):
            self._layout = ParamLayout(params)
        return self._layout

    def _grads(self) -> list[Tensor]:
        grads = [p.grad for p in self._params() if p.grad is not None]
        if not grads:
            raise ValueError(
                "no parameter has a gradient: the closure (or your loop) must call "
                "loss.backward() before first_step()/second_step()"
            )
        return grads

    @torch.no_grad()
    def perturbation(self, grad: Tensor) -> Tensor:
        """The flat perturbation ``ε`` this optimizer would apply for the flat gradient ``grad``
        (for measurements such as Align(ε, v₁); nothing is changed)."""
        layout = self.layout
        eps = [torch.zeros_like(p) for p in layout.locals]
        self._add_perturbation(eps, layout.unflatten(grad))
        return layout.flatten(eps)

    def _add_perturbation(self, targets: list[Tensor], grads: Sequence[Tensor | None]) -> None:
        """Add ``ε`` for the gradients ``grads`` (one per parameter, None for none) to
        ``targets`` (one tensor per parameter; this rank's shards under FSDP2), group by group
        with ``foreach``; nothing when the gradient is 0.

        For SAM's own direction ``ĝ`` (not ASAM, not a variant) with an accurate plain norm, ``ε``
        is added as ``(ρ/‖g‖)·g`` straight from the gradients (no flat copy, no temporaries);
        else through :meth:`_ascent_direction` on the flat gradient, safe for any finite ``g``."""
        if self._direction_is_normalized_gradient():
            present = [g for g in grads if g is not None]
            norm = float(self.layout.norm_of(present))
            dtype = functools.reduce(torch.promote_types, [g.dtype for g in present])
            if plain_norm_is_accurate(norm, dtype):
                self._add_per_group(targets, grads, [1.0 / norm] * len(self.param_groups))
                return
        grad = self.layout.flatten(grads)
        if not self.layout.all_true(not bool(grad.any())):
            directions = self._ascent_direction(grad)
            self._add_per_group(targets, directions, [1.0] * len(self.param_groups))

    def _add_per_group(
        self, targets: list[Tensor], directions: Sequence[Tensor | None], scales: Sequence[float]
    ) -> None:
        """``target += ρ_group · scale_group · direction`` for every parameter with a direction
        (``scales``: one per param group)."""
        start = 0
        for group, scale in zip(self.param_groups, scales, strict=True):
            end = start + len(group["params"])
            chunk = zip(targets[start:end], directions[start:end], strict=True)
            pairs = [(t, d) for t, d in chunk if d is not None]
            if pairs:
                torch._foreach_add_(
                    [t for t, _ in pairs], [d for _, d in pairs], alpha=group["rho"] * scale
                )
            start = end

    def _direction_is_normalized_gradient(self) -> bool:
        """Whether ``ε/ρ`` is ``ĝ``: plain SAM, whose :meth:`_ascent_direction` is not
        overridden, with no ASAM group."""
        overridden = type(self)._ascent_direction is not SAM._ascent_direction
        return not overridden and not any(group["adaptive"] for group in self.param_groups)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler: Any = None) -> bool:
        """Move to ``w + ε`` using the gradients now in ``p.grad`` (saving ``w``), for manual
        loops; return whether the step goes on.

        A NaN/inf gradient skips the step as :meth:`step` does: the weights stay ``w``,
        gradients are cleared, ``on_nonfinite="raise"`` raises ``FloatingPointError`` and
        ``"skip"`` warns; the next :meth:`second_step` then does nothing. With ``scaler`` (a
        ``torch.amp.GradScaler`` whose scaled loss gave these gradients) an overflow skips the
        step silently and the scale backs off at ``scaler.update()``, as ``GradScaler.step``
        does."""
        self._check_ranks()
        self._skipped = False
        if not self._finite(first_pass=True):
            self._skipped = True
            self._nonfinite("first pass", scaler)
            return False
        self._ascend(zero_grad)
        return True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: Any = None) -> bool:
        """Restore ``w`` and let the base optimizer step with the gradients now in ``p.grad``;
        return whether it stepped. After a skipped :meth:`first_step` it only clears the
        gradients; a NaN/inf gradient here skips the step under ``on_nonfinite`` (with
        ``scaler``: ``GradScaler.step`` skips it)."""
        if self._skipped:
            self._skipped = False
            self.zero_grad(set_to_none=True)
            return False
        if not self._perturbed:
            raise RuntimeError("second_step() called without a first_step() before it")
        self._restore_params()
        if scaler is not None and self.layout.sharded:
            raise ValueError(SCALER_UNDER_FSDP2)
        if scaler is None and not self._finite():
            self._nonfinite("second pass", None)
            return False
        self._base_step(scaler)
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return True

    @torch.no_grad()
    def _ascend(self, zero_grad: bool) -> None:
        """Save ``w`` and add ``ε`` for the gradients in ``p.grad`` (checked finite)."""
        self._grads()  # raises if the closure computed none
        layout = self.layout
        self._save_params(layout.locals)
        self._add_perturbation(layout.locals, layout.local([p.grad for p in layout.params]))
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _descent_gradient(self, closure: Callable[[], Tensor], scaler: Any) -> bool:
        """Fill ``p.grad`` with the gradient the base optimizer steps with, after the first pass
        filled it with ``g``; return False when the step was skipped. SAM: the gradient at
        ``w + ε`` (BatchNorm statistics left as the first pass made them), ``w`` restored."""
        self._ascend(zero_grad=True)
        self._second_pass(closure)
        self._restore_params()
        if scaler is None and not self._finite():
            self._nonfinite("second pass", scaler)
            return False
        return True

    @torch.no_grad()
    def _base_step(self, scaler: Any) -> None:
        """The base optimizer's step on the (corrected) descent gradient in ``p.grad``."""
        self._grads()
        self._correct_descent_gradient()
        if scaler is not None:
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self.sam_steps += 1

    @torch.no_grad()
    def _save_params(self, params: list[Tensor]) -> None:
        """Copy ``w`` into a buffer kept between steps (allocated again only when the
        parameters change), so a step allocates no copy of the weights."""
        saved = self._saved_params
        if saved is None or [(s.shape, s.dtype, s.device) for s in saved] != [
            (p.shape, p.dtype, p.device) for p in params
        ]:
            self._saved_params = [p.detach().clone() for p in params]
        else:
            torch._foreach_copy_(saved, [p.detach() for p in params])
        self._perturbed = True

    @torch.no_grad()
    def _restore_params(self) -> None:
        if self._perturbed:
            assert self._saved_params is not None
            torch._foreach_copy_(self.layout.locals, self._saved_params)
            self._perturbed = False

    def _finite(self, loss: Tensor | None = None, *, first_pass: bool = False) -> bool:
        """Whether ``loss`` (first pass) and the gradients are finite; with ``sharpness="local"``
        the first-pass answer is agreed over the replicas, so all of them skip or step; under
        FSDP2 the norms are global and the loss's answer is agreed over the ranks."""
        layout = self.layout
        grad_ok = gradients_finite(layout, self._grads())
        ok = grad_ok and (loss is None or bool(torch.isfinite(loss.detach()).all()))
        if self.sharpness == "local" and first_pass:
            return all_ranks_true(ok)
        if layout.sharded and loss is not None:
            return layout.all_true(ok)
        return ok

    def _rank_signature(self) -> dict[str, Any]:
        """What every replica must agree on: optimizer, sharpness, hyperparameters, shapes."""
        scalars = (bool, int, float, str, type(None))
        return {
            "optimizer": type(self).__name__,
            "base_optimizer": type(self.base_optimizer).__name__,
            "sharpness": self.sharpness,
            "parallelism": "fsdp2" if self.layout.sharded else "ddp" if self.ddp else "none",
            "parameter shapes": [tuple(p.shape) for p in self._params()],
            "param_groups": [
                {k: v for k, v in group.items() if isinstance(v, scalars)}
                for group in self.param_groups
            ],
        }

    def _check_ranks(self) -> None:
        """Once, under DDP or FSDP2: every rank holds the same :meth:`_rank_signature`."""
        if not self._ranks_checked:
            check_same_across_ranks("the optimizer configuration", self._rank_signature())
            self._ranks_checked = True

    def _nonfinite(self, where: str, scaler: Any, stacklevel: int = 4) -> None:
        """Handle a NaN/inf in ``where``: the whole step is skipped (or raises); a warning
        points ``stacklevel`` frames up (the user's call of ``step`` or ``first_step``)."""
        self._restore_params()
        if scaler is not None:
            # GradScaler sees the non-finite gradients, skips the base step and backs off.
            scaler.step(self.base_optimizer)
            self.zero_grad(set_to_none=True)
            return
        self.zero_grad(set_to_none=True)
        message = f"non-finite loss or gradient in the {where}"
        if self.on_nonfinite == "raise":
            raise FloatingPointError(f"{message}; weights were left unchanged")
        warnings.warn(
            f"{message}; step skipped, weights unchanged", RuntimeWarning, stacklevel=stacklevel
        )

    # Unlike torch.optim.Optimizer.step, the closure is required and the loss is a Tensor.
    def step(  # type: ignore[override]
        self,
        closure: Callable[..., Tensor] | None = None,
        scaler: Any = None,
        batch: Batch | None = None,
    ) -> Tensor:
        """Run both passes and the base step; return the first-pass loss, detached (a step
        whose loss or gradient is NaN/inf is skipped, see ``on_nonfinite``).

        ``closure`` computes the loss, calls ``backward()`` on it (``scaler.scale(loss)`` when
        a ``torch.amp.GradScaler`` is passed as ``scaler``; then call ``scaler.update()`` after
        the step) and returns the (unscaled) loss. Gradients are zeroed before each pass.
        With ``batch`` (a tuple of tensors, or a dict), the closure takes the batch as arguments
        and is called as ``closure(*batch)`` (``closure(**batch)``); Eigen-SAM and X-SAM then
        split it into ``hessian_parts`` micro-batches for their exact Hessian-vector products.
        """
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure that computes the loss, calls "
                "backward() and returns the loss; in a manual loop use first_step()/second_step()"
            )
        if scaler is not None and self.layout.sharded:
            raise ValueError(SCALER_UNDER_FSDP2)
        closure = self.bind(closure, batch)
        self._check_ranks()
        self._before_first_pass(closure, scaler)
        self.zero_grad(set_to_none=True)
        loss = self._first_pass(closure)
        if not self._finite(loss, first_pass=True):
            self._nonfinite("first pass", scaler, stacklevel=3)
        elif self._descent_gradient(closure, scaler):
            self._base_step(scaler)
        return loss.detach()

    # -- state ----------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to this optimizer and to the base optimizer (they share the list)."""
        if not hasattr(self, "base_optimizer"):
            super().add_param_group(param_group)
            return
        for name in ("rho", "adaptive", "eta", *self._extra_defaults()):
            param_group.setdefault(name, self.defaults[name])
        self.base_optimizer.add_param_group(param_group)
        self._check_group(param_group)

    #: The entries of this optimizer's ``state_dict()`` that ``load_state_dict`` needs.
    STATE_KEYS: tuple[str, ...] = ("base", "sam_steps")

    def _name(self) -> str:
        """This optimizer and its base, as ``state_dict`` records them: ``"SAM(SGD)"``."""
        return f"{type(self).__name__}({type(self.base_optimizer).__name__})"

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum, Adam moments, param groups), the step count and
        which optimizer saved it (``"optimizer"``, e.g. ``"SAM(SGD)"``)."""
        return {
            "optimizer": self._name(),
            "base": self.base_optimizer.state_dict(),
            "sam_steps": self.sam_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by the same optimizer on the same base optimizer; another
        optimizer's state (another SAM variant, a plain ``torch.optim`` state) raises one
        ``ValueError`` naming both, before anything is changed."""
        self._check_state_dict(state_dict)
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        self.sam_steps = state_dict["sam_steps"]

    def _check_state_dict(self, state_dict: object) -> None:
        mine = self._name()
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"{mine}.load_state_dict: state_dict must be a dict from {mine}.state_dict(), "
                f"got {type(state_dict).__name__}"
            )
        saved = state_dict.get("optimizer")
        missing = [key for key in self.STATE_KEYS if key not in state_dict]
        if saved is None and not missing:
            return  # saved before optimizers recorded their name
        if saved == mine and not missing:
            return
        hint = f"load a state saved by {mine}.state_dict()"
        if saved is not None:
            theirs = f"the state of {saved}"
        elif {"state", "param_groups"} <= state_dict.keys():
            theirs = "a plain torch.optim optimizer's state (keys 'state', 'param_groups')"
            hint = "to start from it, load it into the base optimizer: "
            hint += "opt.base_optimizer.load_state_dict(state)"
        else:
            theirs = f"a state without {missing} (keys {sorted(state_dict)})"
        raise ValueError(f"{mine}.load_state_dict: cannot load {theirs} into {mine}; {hint}")
