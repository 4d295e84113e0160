"""Sharpness-aware training in the Hugging Face ``Trainer``: :class:`SAMTrainer`.

The ``Trainer`` runs the forward and backward passes of each micro-batch in ``training_step``
and then calls ``optimizer.step()`` without a closure, so a plain ``Trainer`` cannot run a
two-pass optimizer: handed an eigensam optimizer, its first ``optimizer.step()`` raises
``TypeError`` (eigensam's ``step`` needs a closure). :class:`SAMTrainer` runs the whole step
through the optimizer's closure instead::

    opt = EigenSAM(model, torch.optim.AdamW, rho=0.05, lr=3e-4, weight_decay=0.01)
    trainer = SAMTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()

What one optimizer step does (``gradient_accumulation_steps = k``, micro-batches ``B_1..B_k``):

- ``training_step`` collects the micro-batches of the accumulation group; on the last one it
  calls ``opt.step(closure)``, where the closure runs forward and backward on all ``k``
  micro-batches (the Trainer's own ``compute_loss`` and loss scaling, so the accumulated gradient
  is the one the plain Trainer would step with: ``∇L`` with ``L = (1/k)·Σ_i L(B_i)``, or the
  token-weighted mean when the model normalizes by ``num_items_in_batch``). So SAM's ``ε``,
  Eigen-SAM's Hessian-vector products and the second pass all see the whole accumulated batch:
  ``k`` micro-batches of size ``B`` give exactly the step of one batch of size ``k·B``, at the
  memory of one micro-batch: exact Hessian-vector products are summed over the micro-batches
  (a :class:`~eigensam.hessian.hvp.SplitClosure`), one graph at a time. Each pass costs ``k``
  forward/backward passes. Under DDP the
  gradients are all-reduced once per pass (``no_sync`` on all but the last micro-batch).
- ``max_grad_norm``: the gradient clipped is the **second-pass** gradient, the one the base
  optimizer steps with (after X-SAM's correction), in a step pre-hook of the base optimizer.
  The first-pass gradient is not clipped: SAM's and Eigen-SAM's ``ε`` depend on it only through
  ``g/‖g‖`` and the sign of ``⟨g, v̂⟩``, which a global-norm clip (a positive rescaling) does not
  change. The logged ``grad_norm`` is the second-pass norm before clipping.
- The loss logged is the first-pass loss, the loss at ``w`` the plain Trainer would log.
- The learning-rate scheduler (yours, or the one the Trainer creates from ``lr_scheduler_type``)
  steps once per optimizer step; both optimizers share ``param_groups``.
- Checkpoints (``save_steps``) hold the eigensam optimizer's ``state_dict()``: the base
  optimizer's state (AdamW moments), the step count and, for Eigen-SAM/X-SAM, ``v̂`` with its
  random generator; ``resume_from_checkpoint`` continues bit for bit on CPU.
- bf16 (``bf16=True``) runs both passes under the Trainer's autocast. fp16 is refused: eigensam
  needs the GradScaler passed to ``step``, which the Trainer's accelerator keeps to itself.
- DDP (``torchrun``): the optimizer is built on the bare model before the Trainer wraps it; at
  the first step :class:`SAMTrainer` hands the ``DistributedDataParallel`` wrapper to the
  optimizer, as if it had been built with ``model=wrapper``: ``ε`` from the all-reduced gradient
  and Hessian-vector products averaged over the ranks. ``sharpness="local"`` needs the wrapper at
  construction and is therefore not available here.

- FSDP2 (``fsdp=True``, under ``torchrun``): the Trainer shards the model in ``train()``, after
  the optimizer exists, and Accelerate swaps the optimizer's parameters for the shards; at the
  first step the eigensam optimizer takes them up (:meth:`~eigensam.optim.SAM.attach_fsdp`):
  ``ε`` from the global gradient norm, ``v̂`` sharded like the weights, finite-difference
  products. Checkpoints save the optimizer's sharded state with ``torch.distributed.checkpoint``
  (:mod:`eigensam.optim.checkpoint`) in ``eigensam_optimizer/`` beside the Trainer's FSDP
  model checkpoint.

Refused with ``ValueError`` naming the option: ``deepspeed=`` (DeepSpeed runs its own optimizer
step), FSDP version 1 (``fsdp_config={"version": 1}``) and ``fp16=True``. A batch whose
sequence length exceeds the model's ``max_position_embeddings`` (or ``n_positions``) raises
``ValueError`` before any forward pass.

Callbacks' ``on_pre_optimizer_step`` run after the eigensam step has been taken (the Trainer
calls them after ``training_step``); the gradients are then already cleared.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

try:
    from accelerate.utils import save_fsdp_model
    from transformers import Trainer, TrainingArguments
    from transformers.distributed.fsdp import get_fsdp_ckpt_kwargs
    from transformers.trainer import SCHEDULER_NAME
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "eigensam.integrations.transformers needs Hugging Face Transformers and Accelerate: "
        'pip install "eigensam[hf]"'
    ) from error

from eigensam.hessian.closures import SplitClosure
from eigensam.optim import SAM
from eigensam.optim.checkpoint import distributed_state_dict, load_distributed_state_dict
from eigensam.parallel import is_fsdp2

# The eigensam optimizer's DCP checkpoint under FSDP2, inside the Trainer's checkpoint folder.
FSDP_OPTIMIZER_DIR = "eigensam_optimizer"
INSTALL_HINT = 'pip install "eigensam[hf]"'
# Config attributes that bound the sequence length, in the order they are looked up.
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "n_ctx")


def check_arguments(args: TrainingArguments) -> None:
    """Raise ``ValueError`` naming the ``TrainingArguments`` option that :class:`SAMTrainer`
    cannot honour: ``deepspeed``, FSDP version 1 (``fsdp_config``), ``fp16``."""
    if getattr(args, "deepspeed", None):
        raise ValueError(
            f"TrainingArguments(deepspeed={args.deepspeed!r}) is not supported by SAMTrainer: "
            "DeepSpeed takes over the optimizer step, which cannot run eigensam's two passes; "
            "remove deepspeed= (single-process and DDP/torchrun training are supported)"
        )
    version = int((getattr(args, "fsdp_config", None) or {}).get("version", 2))
    if getattr(args, "fsdp", None) and version != 2:
        raise ValueError(
            f"TrainingArguments(fsdp_config={{'version': {version}}}) is not supported by "
            "SAMTrainer: FSDP1 (FullyShardedDataParallel) hides the parameters eigensam "
            "perturbs; use FSDP2, fsdp_config={'version': 2} (the default)"
        )
    if getattr(args, "fp16", False):
        raise ValueError(
            "TrainingArguments(fp16=True) is not supported by SAMTrainer: eigensam's step needs "
            "the GradScaler, which the Trainer keeps; use bf16=True (no loss scaling needed)"
        )


def sequence_limit(model: nn.Module) -> int | None:
    """The longest sequence ``model`` accepts: its config's ``max_position_embeddings``,
    ``n_positions`` or ``n_ctx`` (the first that is set), or None when it declares none."""
    config = getattr(model, "config", None)
    for name in POSITION_LIMITS:
        limit = getattr(config, name, None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return None


def check_sequence_length(inputs: Mapping[str, Any], limit: int | None) -> None:
    """Raise ``ValueError`` when ``input_ids`` (or ``labels``) of a batch is longer than
    ``limit`` positions."""
    if limit is None:
        return
    for name in ("input_ids", "labels"):
        value = inputs.get(name)
        if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[-1] > limit:
            raise ValueError(
                f"{name} has sequence length {value.shape[-1]}, longer than the model allows "
                f"(config max_position_embeddings/n_positions = {limit}); truncate the data "
                f"(e.g. the tokenizer's max_length={limit}) or build the model with a larger "
                "context"
            )


class TrainerOptimizer(Optimizer):
    """The optimizer object a :class:`SAMTrainer` hands to the ``Trainer`` in place of the
    eigensam optimizer ``sam``: it shares ``sam``'s ``param_groups`` (so the Trainer's LR
    scheduler drives ``sam``), saves and loads ``sam``'s full ``state_dict()``, and its
    closure-less ``step()`` (the Trainer's call after ``training_step``) only checks that
    :class:`SAMTrainer` has just taken the eigensam step."""

    def __init__(self, sam: SAM):  # Optimizer.__init__ is not called: everything delegates.
        self.sam = sam
        self.step_taken = False

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.sam.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.sam.param_groups = self.sam.base_optimizer.param_groups = groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.sam.base_optimizer.state

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.sam.defaults

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        if closure is not None:
            return self.sam.step(closure)
        if not self.step_taken:
            raise RuntimeError(
                "optimizer.step() was called without a closure before SAMTrainer.training_step "
                "took the eigensam step; a Trainer subclass that overrides training_step must "
                "call SAMTrainer.training_step"
            )
        self.step_taken = False
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sam.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.sam.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.sam.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        tracker = state_dict.get("tracker")
        if isinstance(tracker, dict) and isinstance(tracker.get("generator"), Tensor):
            # A random generator's state is a CPU byte tensor; the Trainer and Accelerate load
            # optimizer states onto the training device.
            state_dict = {**state_dict, "tracker": {**tracker}}
            state_dict["tracker"]["generator"] = tracker["generator"].cpu()
        self.sam.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"TrainerOptimizer({self.sam!r})"


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with an eigensam optimizer (SAM, ASAM, Eigen-SAM,
    X-SAM, Reverse-SAM, EGR), passed as ``optimizers=(optimizer, scheduler_or_None)`` and built
    on the model given to the Trainer (``EigenSAM(model, torch.optim.AdamW, ...)``).

    Every optimizer step is ``optimizer.step(closure)`` with a closure over the whole gradient
    accumulation group; see the module documentation for gradient accumulation, clipping
    (second pass), bf16, checkpoints, DDP and FSDP2. All other ``Trainer`` arguments work as
    usual. ``eigensam_optimizer`` is the eigensam optimizer; ``optimizer`` is the Trainer's view
    of it (:class:`TrainerOptimizer`, wrapped by Accelerate).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        given = kwargs.get("args", args[1] if len(args) > 1 else None)
        if given is not None:
            check_arguments(given)
        optimizers = kwargs.get("optimizers")
        sam = optimizers[0] if isinstance(optimizers, tuple | list) and optimizers else None
        if not isinstance(sam, SAM):
            raise TypeError(
                "SAMTrainer needs an eigensam optimizer as the keyword argument "
                "optimizers=(optimizer, scheduler_or_None), "
                f"e.g. EigenSAM(model, torch.optim.AdamW, lr=...); got optimizers[0]={sam!r} "
                "(for a plain torch optimizer use transformers.Trainer)"
            )
        # The Trainer refuses optimizers= under FSDP (it shards the model in train(), after the
        # optimizer exists); Accelerate then swaps the optimizer's parameters for the shards and
        # training_step has the eigensam optimizer take them up (SAM.attach_fsdp).
        super().__init__(*args, **{**kwargs, "optimizers": (None, None)})
        check_arguments(self.args)
        if self.is_deepspeed_enabled:
            raise ValueError(
                "the Accelerate configuration enables DeepSpeed, which SAMTrainer does not "
                "support; launch with DDP (torchrun), FSDP2 (fsdp=) or a single process"
            )
        if self.args.fsdp and not self.is_fsdp_enabled:
            warnings.warn(
                f"TrainingArguments(fsdp={self.args.fsdp!r}): Accelerate enables FSDP only on "
                "GPUs and other accelerators, so this run is not sharded; the Trainer runs DDP "
                "and the eigensam optimizer follows it",
                UserWarning,
                stacklevel=2,
            )
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise ValueError(
                "the Accelerate configuration enables FSDP version 1, which SAMTrainer does not "
                "support; use FSDP2 (fsdp_version: 2)"
            )
        if sam.model is not None and sam.model is not self.model:
            raise ValueError(
                "optimizers[0] was built on a different module than model=; build it on the "
                "model passed to SAMTrainer"
            )
        self.eigensam_optimizer = sam
        self._view = TrainerOptimizer(sam)
        self.optimizer = self._view
        self.lr_scheduler = optimizers[1] if len(optimizers) > 1 else None
        self._sequence_limit = sequence_limit(self.model)
        self._micro_batches: list[dict[str, Any]] = []
        self._grad_norm: Tensor | None = None

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Collect ``inputs``; on the last micro-batch of the accumulation group run the
        eigensam step over all of them and return the first-pass loss (0 for the others, so
        the Trainer's running sum is the group's loss)."""
        check_sequence_length(inputs, self._sequence_limit)
        self._micro_batches.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        batches, self._micro_batches = self._micro_batches, []
        sam = self.eigensam_optimizer
        if isinstance(model, DistributedDataParallel) and sam.ddp is not model:
            sam.attach_ddp(model)
        if is_fsdp2(model) and not sam.layout.sharded:
            sam.attach_fsdp()
        model.train()
        self._grad_norm = None
        hook = sam.base_optimizer.register_step_pre_hook(self._clip_second_pass)
        try:
            loss = sam.step(self._closure(model, batches, num_items_in_batch))
        finally:
            hook.remove()
        sam.zero_grad(set_to_none=True)
        self._view.step_taken = True
        return loss.detach()

    def _closure(
        self, model: nn.Module, batches: list[dict[str, Any]], num_items: Tensor | int | None
    ) -> Callable[[], Tensor]:
        """The closure of one optimizer step: forward and backward on every micro-batch, the
        gradients summing to the accumulated batch's; returns the accumulated loss. With several
        micro-batches it is a :class:`~eigensam.hessian.hvp.SplitClosure` whose parts are the
        micro-batches (their scaled losses sum to the accumulated loss), so exact
        Hessian-vector products keep one micro-batch's graph at a time."""
        count = len(batches)

        def closure() -> Tensor:
            total = torch.zeros((), device=self.args.device)
            for i, inputs in enumerate(batches):
                sync = (
                    contextlib.nullcontext() if i == count - 1 else self.accelerator.no_sync(model)
                )
                with sync:
                    total = total + self._micro_batch(model, inputs, num_items, count)
            return total

        if count == 1:
            return closure
        parts = [
            functools.partial(self._micro_batch, model, inputs, num_items, count)
            for inputs in batches
        ]
        return SplitClosure(closure, parts)

    def _micro_batch(
        self, model: nn.Module, inputs: dict[str, Any], num_items: Tensor | int | None, count: int
    ) -> Tensor:
        """Forward and backward on one micro-batch with the Trainer's loss and its scaling for
        gradient accumulation (``Trainer.training_step`` without its ``model.train()``, which
        would undo the eval mode of Hessian-vector products)."""
        with self.compute_loss_context_manager():
            # compute_loss may pop "labels": give it a copy, the closure runs several times.
            loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items is not None
            ) or self.compute_loss_func is not None
        if not scaled:
            loss = loss / count
        self.accelerator.backward(loss)
        return loss.detach()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's, except under FSDP2: there the eigensam optimizer's sharded state
        (base state, step count, ``v̂``) goes through ``torch.distributed.checkpoint``
        (:mod:`eigensam.optim.checkpoint`) into ``<output_dir>/eigensam_optimizer``, beside the
        Trainer's FSDP model checkpoint and scheduler."""
        if not self.is_fsdp_enabled:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        plugin = self.accelerator.state.fsdp_plugin
        save_fsdp_model(plugin, self.accelerator, self.model, output_dir, **get_fsdp_ckpt_kwargs())
        state = {"optimizer": distributed_state_dict(self.eigensam_optimizer)}
        dcp.save(state, checkpoint_id=os.path.join(output_dir, FSDP_OPTIMIZER_DIR))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer's, except under FSDP2 (see :meth:`_save_optimizer_and_scheduler`)."""
        if not self.is_fsdp_enabled or checkpoint is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        folder = os.path.join(checkpoint, FSDP_OPTIMIZER_DIR)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"resume_from_checkpoint={checkpoint!r} has no {FSDP_OPTIMIZER_DIR}/: it was "
                "not saved by SAMTrainer under FSDP2"
            )
        state = {"optimizer": distributed_state_dict(self.eigensam_optimizer)}
        dcp.load(state, checkpoint_id=folder)
        load_distributed_state_dict(self.eigensam_optimizer, state["optimizer"])
        scheduler = torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        self.lr_scheduler.load_state_dict(scheduler)

    def _clip_second_pass(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Base optimizer step pre-hook: record the second-pass gradient norm and clip it to
        ``max_grad_norm`` (when > 0)."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        limit = self.args.max_grad_norm
        max_norm = float(limit) if limit is not None and limit > 0 else float("inf")
        self._grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _clip_grad_norm(self, model: nn.Module) -> Tensor | float:
        """The Trainer's clipping call after ``training_step``: clipping happened inside the
        step; return the second-pass norm before clipping (NaN for a skipped step)."""
        return self._grad_norm if self._grad_norm is not None else float("nan")

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        return self._clip_grad_norm(model) if grad_norm is None else grad_norm
