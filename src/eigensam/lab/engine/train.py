"""The training engine: :class:`Trainer` and :func:`train` (loop, tracking, checkpoints and
resume), with the closures, device check and snapshot names they use.

One run trains ``config.model`` on ``config.dataset`` with SGD (momentum, weight decay) wrapped by
the chosen sharpness-aware method, evaluates every epoch and writes its run folder
(:mod:`eigensam.lab.engine.run_folder`). The learning rate follows a cosine schedule *per step*:
``lr_t = lr · ½(1 + cos(π t / T))`` for step ``t`` of ``T = epochs · steps_per_epoch`` (the value
used for step ``t`` is ``lr_t``; the first step uses ``lr``).

Runs are reproducible on CPU from ``seed``: it seeds the model initialization and dropout (the
global torch RNG), the shuffling and augmentation (the batch loader's own generator) and the
Eigen-SAM/X-SAM eigenvector start; ``data_seed`` picks the training subset and validation split,
so that all seeds of a comparison see the same data. A checkpoint stores every RNG state, so a
resumed run reaches the same weights, bit for bit, as an uninterrupted one.

The optimizer takes each step as ``step(closure, batch=(images, labels))``
(:func:`~eigensam.optim.take_step`), so its exact Hessian-vector products (Eigen-SAM, X-SAM,
EGR) are summed over ``hessian_parts`` micro-batches of the batch, one part's double-backward
graph alive at a time: the same products (up to rounding) at a fraction of the memory. The
optimizer resolves the number (:meth:`~eigensam.optim.sam.SAM.split_count`, recorded in the
summary); its passes use the whole batch.

Sharpness tracking (``track_every = k > 0``) measures, every ``k`` steps, on the current batch and
*before* the optimizer step, in train mode (the loss being optimized, whatever ``hessian_mode``
the optimizer uses):

- λ₁ of the mini-batch loss by Lanczos (algebraically largest, warm-started from the previous
  measurement, stopped when the relative residual ``‖Hv − λv‖/|λ|`` is at most ``track_tol`` or
  after ``track_iters`` products), with its residual;
- the gradient norm, and Align(ε, v₁) and |cos(ε, v₁)| of the perturbation ε the optimizer
  applies at that step (for SGD and EGR, which apply none, those of the gradient);
- for Eigen-SAM and X-SAM, their own cheap estimate: its eigenvalue and |cos(v̂, v₁)|. When a
  refresh of v̂ is due at that step it is run first on a copy of their tracker (same batch, RNG
  and start: the same result), so ε and v̂ are the ones the step uses.

Every measurement runs inside a :class:`HessianOperator`, which restores the RNG state,
BatchNorm buffers, module modes and gradients, so tracking never changes the trajectory; its
wall time is reported separately from training time. At the end of a tracked run, λ₁ is measured
once more on a fixed batch (the first ``batch_size`` training samples, not augmented), the
``final_lambda1`` of the summary, comparable across methods and seeds.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint import CheckpointException
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from eigensam.hessian.closures import bind_batch
from eigensam.lab.engine import launch as distributed
from eigensam.lab.engine import run_folder as tracking
from eigensam.lab.engine.config import (
    TrainConfig,
    check_same_run,
    checkpoint_config,
    load_config,
)
from eigensam.lab.engine.evaluation import EVAL_BATCH_SIZE, evaluate, evaluation_sums
from eigensam.lab.engine.optimizers import build_optimizer, make_scheduler
from eigensam.lab.engine.sharpness_probe import SharpnessProbe, mean_or_none
from eigensam.lab.engine.trained_model import training_data
from eigensam.lab.workloads.datasets import (
    BatchLoader,
    DataSplits,
    TensorData,
    default_augmentation,
)
from eigensam.lab.workloads.models import build_model, kaiming_init
from eigensam.optim import SAM, take_step
from eigensam.optim.stepping import step_closure
from eigensam.parallel import MeanAcrossRanks, ParamLayout, check_same_across_ranks, reshard


def snapshot_file(epoch: int) -> str:
    """File name of the checkpoint kept after ``epoch`` (``snapshot_epochs``)."""
    return f"checkpoint-epoch{epoch}.pt"


def check_device(name: str) -> torch.device:
    """``torch.device(name)`` if a tensor can be allocated there, else a ValueError."""
    device = torch.device(name)
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"device {name!r} is not available here ({error})") from None
    return device


def loss_closure(model: nn.Module, criterion: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The optimizer's closure of a batch ``(images, labels)``: loss, ``backward()``, return the
    loss (passed to ``step(closure, batch=(images, labels))``)."""

    def closure(images: Tensor, labels: Tensor) -> Tensor:
        loss = criterion(model(images), labels)
        loss.backward()
        return loss

    return closure


def make_closure(
    model: nn.Module, criterion: nn.Module, images: Tensor, labels: Tensor
) -> Callable[[], Tensor]:
    """The torch.optim closure of one batch: loss, ``backward()``, return the loss."""
    return bind_batch(loss_closure(model, criterion), (images, labels))


def resumable_config(config: TrainConfig, resume: Path | str | None) -> TrainConfig:
    """``config`` for a new run, whose folder must not hold a run yet; with ``resume`` (a run
    folder, which must hold one started with the same configuration, ``out_dir``, ``data_dir``
    and ``download`` aside) ``config`` with ``out_dir`` set to it."""
    if resume is None:
        if (config.run_dir / tracking.CONFIG_FILE).exists():
            raise ValueError(
                f"out_dir {str(config.run_dir)!r} already holds a run; resume it "
                "(--resume) or choose another out_dir"
            )
        return config
    resume = Path(resume)
    snapshot = resume / tracking.CONFIG_FILE
    if not snapshot.is_file():
        raise FileNotFoundError(f"resume: {resume} holds no run ({snapshot} is missing)")
    config = dataclasses.replace(config, out_dir=str(resume))
    check_same_run(load_config(snapshot), config, resume)
    return config


class Trainer:
    """One training run, prepared on construction (validation, data, model, optimizer, run
    folder, checkpoint restored when resuming) and executed by :meth:`run`.

    ``resume`` is a run folder: the run continues from its last checkpoint (from scratch if it
    has none) and ``config`` must match the one it was started with (``out_dir``, ``data_dir``
    and ``download`` aside). Without ``resume``, the run folder must not hold a run yet.
    ``data`` may pass the already loaded splits of ``config``'s dataset.

    Under ``torchrun`` (or in a process group already initialized) every process runs a Trainer
    with the same configuration (checked: ``ValueError`` naming the fields that differ). The
    model is wrapped in ``DistributedDataParallel``; ``batch_size`` is the global batch, split
    evenly over the ranks by a ``DistributedSampler`` layout of each epoch (so N processes run
    the algorithm of one process, ``sharpness="global"``); the logged training loss is the
    global batch's; evaluation is sharded and summed over the ranks; rank 0 alone writes the run
    folder (logs, checkpoints, summary); a resumed run loads rank 0's checkpoint on every rank.
    With ``strategy="fsdp"`` the model is sharded by FSDP2 instead
    (:func:`~eigensam.lab.engine.launch.shard_model`), and every rank writes its shards of the model
    and optimizer state with ``torch.distributed.checkpoint`` beside the checkpoint file, which
    names them (:meth:`_save`).
    """

    def __init__(
        self,
        config: TrainConfig,
        resume: Path | str | None = None,
        data: DataSplits | None = None,
    ):
        self.config = config = resumable_config(config, resume)
        self.dir = config.run_dir
        self.ranks = distributed.join(config.device)
        self.device = self._check_ranks()
        self.data = training_data(config) if data is None else data
        reduce = self._build_model()
        self._build_optimizer()
        self._build_probe(reduce)
        self._start_progress()
        self._open_run_folder(resume is not None)

    # -- construction, in order ----------------------------------------------------------------

    def _check_ranks(self) -> torch.device:
        """Under torchrun: every rank has the same configuration and a share of the global
        batch; the device of this process (``cuda`` is this rank's GPU)."""
        config, device = self.config, self.config.device
        if self.ranks.distributed:
            check_same_across_ranks("the training configuration", config.to_dict())
            if config.batch_size % self.ranks.world_size:
                raise ValueError(
                    f"batch_size {config.batch_size} (the global batch) must be divisible by the "
                    f"number of processes, {self.ranks.world_size}"
                )
            if device == "cuda":
                device = f"cuda:{self.ranks.local_rank}"
        elif config.strategy == "fsdp":
            raise ValueError(
                "strategy fsdp shards the model over the processes of a torchrun job, but this "
                "process runs alone: launch with torchrun --nproc_per_node N (N >= 2) or use "
                "strategy ddp"
            )
        self.sharded = self.ranks.distributed and config.strategy == "fsdp"
        self._sharded_saved: set[str] = set()  # sharded folders this run wrote or loaded
        return check_device(device)

    def _build_model(self) -> MeanAcrossRanks | None:
        """``model`` (seeded with ``seed``) on the device, and ``net``, what the training
        closure calls: the model, its DDP wrapper, or (FSDP2) the model itself sharded. Returns
        the average over the ranks that the probe's products need under DDP."""
        config, data = self.config, self.data
        torch.manual_seed(config.seed)
        self.model = build_model(
            config.model, data.num_classes, data.in_channels, data.image_size, config.width
        )
        if config.init == "kaiming":
            kaiming_init(self.model)
        self.model.to(self.device)
        self.net: nn.Module = self.model
        if self.sharded:
            self.net = distributed.shard_model(self.model)
        elif self.ranks.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
            return MeanAcrossRanks()
        return None

    def _build_optimizer(self) -> None:
        """The optimizer (it resolves ``hessian_parts``, recorded in the summary), this rank's
        batch loader, the schedule over all steps and the training closure."""
        config = self.config
        self.optimizer = build_optimizer(config.optimizer, self.net)
        augment = default_augmentation(config.dataset) if config.augment else None
        self.loader = BatchLoader(
            self.data.train,
            config.batch_size // self.ranks.world_size,
            shuffle=True,
            augment=augment,
            generator=torch.Generator().manual_seed(config.seed),
            shard=(self.ranks.rank, self.ranks.world_size),
        )
        self.total_steps = config.epochs * len(self.loader)
        self.scheduler = make_scheduler(config.lr_schedule, self.optimizer, self.total_steps)
        self.hessian_parts = (
            self.optimizer.split_count(self.loader.batch_size)
            if isinstance(self.optimizer, SAM)
            else 1
        )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.closure = loss_closure(self.net, self.criterion)

    def _build_probe(self, reduce: MeanAcrossRanks | None) -> None:
        """The sharpness probe and its fixed batches' closures (``track_every > 0``)."""
        config = self.config
        self.probe = None
        self.fixed_closures: list[Callable[[], Tensor]] = []
        if config.track_every > 0:
            self.probe = SharpnessProbe(
                config.track_iters, config.track_tol, config.seed, reduce, config.track_hvp
            )
            self.fixed_closures = [
                make_closure(self.model, self.criterion, images, labels)
                for images, labels in self.fixed_batches(config.track_batches)
            ]

    def _start_progress(self) -> None:
        """Step 0 of epoch 0: no records, sums or time yet."""
        self.step = 0
        self.epoch = 0
        self.checkpoint_step: int | None = None
        self._quiet_bar = False
        self.records: list[tracking.Record] = []
        self.sums = {"epoch_loss": 0.0, "epoch_steps": 0, "window_loss": 0.0, "window_steps": 0}
        self.seconds = {"train": 0.0, "track": 0.0, "eval": 0.0}
        self._clock = time.perf_counter()

    def _open_run_folder(self, resuming: bool) -> None:
        """Restore the folder's checkpoint when resuming (if it has one), else write the
        configuration snapshot; rank 0 (re)writes the metrics file."""
        checkpoint = self.dir / tracking.CHECKPOINT_FILE
        if resuming and checkpoint.is_file():
            state = tracking.load_checkpoint(checkpoint)
            written = f"checkpoint {checkpoint} was written by a run"
            check_same_run(checkpoint_config(state, checkpoint), self.config, checkpoint, written)
            self._restore(state, checkpoint)
        elif self.ranks.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            tracking.write_yaml(self.dir / tracking.CONFIG_FILE, self.config.to_dict())
        if self.ranks.main:
            tracking.write_records(self.dir / tracking.METRICS_FILE, self.records)
        distributed.barrier()

    # -- bookkeeping -------------------------------------------------------------------------

    def _lap(self, bucket: str) -> None:
        """Charge the wall time since the previous lap to ``bucket`` (train, track or eval)."""
        now = time.perf_counter()
        self.seconds[bucket] += now - self._clock
        self._clock = now

    def _log(self, record: tracking.Record) -> None:
        self.records.append(record)
        if self.ranks.main:
            tracking.append_record(self.dir / tracking.METRICS_FILE, record)

    def _mean_over_ranks(self, value: float) -> float:
        return distributed.sum_across_ranks([value])[0] / self.ranks.world_size

    def _evaluate(self, data: TensorData) -> tuple[float, float]:
        """Mean loss and accuracy on ``data``; under torchrun each rank takes a shard."""
        if not self.ranks.distributed:
            return evaluate(self.model, data, self.device)
        distributed.broadcast_buffers(self.model)
        part = distributed.rank_shard(data, self.ranks)
        # FSDP2 gathers weights in every forward pass: all ranks run as many (their shards
        # differ in size by at most one sample).
        largest = -(-len(data) // self.ranks.world_size)
        count = -(-largest // EVAL_BATCH_SIZE) if self.sharded else None
        total_loss, correct = evaluation_sums(self.model, part, self.device, count)
        if self.sharded:
            reshard(self.model)  # forward passes without backward leave the root gathered
        total_loss, correct = distributed.sum_across_ranks([total_loss, correct])
        return total_loss / len(data), correct / len(data)

    def state_dict(self, sharded: str | None = None) -> dict[str, Any]:
        """Everything needed to continue the run bit for bit. Under FSDP2 the model and
        optimizer state are not in it (None) but in the ``sharded`` folder beside the checkpoint
        file that every rank wrote (:meth:`_save`), whose name it keeps."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "config": self.config.to_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "model": None if self.sharded else self.model.state_dict(),
            "optimizer": None if self.sharded else self.optimizer.state_dict(),
            "sharded": sharded,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng,
            "probe": None if self.probe is None else self.probe.state_dict(),
            "sums": dict(self.sums),
            "seconds": dict(self.seconds),
            "records": list(self.records),
        }

    def _restore(self, state: Mapping[str, Any], file: Path) -> None:
        """Load a checkpoint's state; one that does not fit this run raises ``ValueError``
        naming ``file`` (nothing is written before)."""
        probe = None
        try:
            if self.sharded:
                if not state.get("sharded"):
                    raise ValueError("it holds no sharded (strategy fsdp) model state")
                probe = self._sharded_probe_state()
                distributed.load_sharded(
                    file.parent / state["sharded"], self.model, self.optimizer, probe
                )
                self._sharded_saved.add(state["sharded"])
            else:
                if state["model"] is None:
                    raise ValueError("its model state is sharded (strategy fsdp)")
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.loader.load_state_dict(state["loader"])
        except (RuntimeError, ValueError, KeyError, TypeError, CheckpointException) as error:
            reason = (str(error).splitlines() or [""])[0]
            raise ValueError(
                f"checkpoint {file} does not fit this run's model and optimizer "
                f"({type(error).__name__}: {reason})"
            ) from error
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if self.probe is not None:
            self.probe.load_state_dict(state["probe"])
            if self.sharded and probe is not None:
                self.probe.load_sharded_state(probe["probe"], self._trainable_layout())
        self.step = self.checkpoint_step = state["step"]
        self.epoch = state["epoch"]
        self.sums = dict(state["sums"])
        self.seconds = dict(state["seconds"])
        self.records = list(state["records"])

    def _trainable_layout(self) -> ParamLayout:
        """The layout of the parameters the probe's products act on (sharded: strategy fsdp)."""
        reshard(self.model)  # after an evaluation the root's gathered parameters are registered
        return ParamLayout([p for p in self.model.parameters() if p.requires_grad])

    def _sharded_probe_state(self) -> dict[str, Any] | None:
        """The probe's warm-start vectors as the sharded checkpoint holds them (None without
        a probe)."""
        if self.probe is None:
            return None
        streams = len(self.fixed_closures)
        return {"probe": self.probe.sharded_state(self._trainable_layout(), streams)}

    def _checkpoint(self) -> None:
        self._lap("train")
        distributed.broadcast_buffers(self.model)  # rank 0's state is every rank's state
        self._save(self.dir / tracking.CHECKPOINT_FILE)
        self.checkpoint_step = self.step

    def _save(self, file: Path) -> None:
        """Rank 0 writes the checkpoint ``file`` (atomically). Under FSDP2 every rank first
        writes its shards of the model and optimizer state with ``torch.distributed.checkpoint``
        into the folder ``<file stem>-step<step>.dcp`` beside it, which the file names; the
        folder of an earlier step is removed once the file names the new one, so a crash at any
        point leaves a complete checkpoint."""
        folder = file.with_name(f"{file.stem}-step{self.step}.dcp")
        # Written once per step (a step's end-of-epoch checkpoint may follow its step
        # checkpoint); decided from state every rank shares, since the save is collective.
        if self.sharded and folder.name not in self._sharded_saved:
            probe = self._sharded_probe_state()
            distributed.save_sharded(folder, self.model, self.optimizer, probe)
            self._sharded_saved.add(folder.name)
        if not self.ranks.main:
            return
        tracking.save_checkpoint(file, self.state_dict(folder.name if self.sharded else None))
        for old in file.parent.glob(f"{file.stem}-step*.dcp"):
            if old != folder:
                shutil.rmtree(old)

    # -- training ------------------------------------------------------------------------------

    def run(self, on_step: Callable[[Trainer], None] | None = None) -> dict[str, Any]:
        """Train to the last epoch, write the summary and return it. ``on_step(trainer)`` is
        called after every step (and its checkpoint). A NaN loss (``FloatingPointError``) or an
        interrupt stops the run with a ``stopped`` record; the last checkpoint stays valid."""
        config = self.config
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"{config.method} seed {config.seed}",
            unit="step",
            disable=not sys.stdout.isatty() or not self.ranks.main,
        )
        self._quiet_bar = bar.disable and self.ranks.main  # rank 0 alone reports progress
        self._clock = time.perf_counter()
        try:
            while self.epoch < config.epochs:
                for images, labels in self.loader:
                    self._train_step(images.to(self.device), labels.to(self.device))
                    bar.update(1)
                    every = config.checkpoint_every_steps
                    if every and self.step % every == 0:
                        self._checkpoint()
                    if on_step is not None:
                        on_step(self)
                self._end_epoch()
                bar.set_postfix(epoch=self.epoch, test_acc=self.records[-1]["test_acc"])
            return self._finish()
        except (KeyboardInterrupt, FloatingPointError) as error:
            self._lap("train")
            stopped = {"kind": "stopped", "step": self.step, "epoch": self.epoch}
            self._log({**stopped, "reason": type(error).__name__, "message": str(error)})
            if isinstance(error, FloatingPointError):
                saved = (
                    "no checkpoint was written yet"
                    if self.checkpoint_step is None
                    else f"the last checkpoint (step {self.checkpoint_step}) is in {self.dir}"
                )
                raise FloatingPointError(
                    f"training stopped at step {self.step}: {error}; {saved}"
                ) from error
            raise
        finally:
            bar.close()

    def _train_step(self, images: Tensor, labels: Tensor) -> None:
        config = self.config
        batch = (images, labels)
        if self.probe is not None and self.step % config.track_every == 0:
            self._lap("train")
            # The closure the step runs, on the unwrapped model (a refresh's micro-batches).
            local = step_closure(self.optimizer, loss_closure(self.model, self.criterion), batch)
            record = self.probe.measure(local, self.model, self.optimizer, self.fixed_closures)
            self._lap("track")
            self._log({"kind": "track", "step": self.step, "epoch": self.epoch, **record})
        lr = self.optimizer.param_groups[0]["lr"]
        loss = self._mean_over_ranks(float(take_step(self.optimizer, self.closure, batch)))
        self.scheduler.step()
        self.step += 1
        self.sums["epoch_loss"] += loss
        self.sums["epoch_steps"] += 1
        self.sums["window_loss"] += loss
        self.sums["window_steps"] += 1
        if self.step % config.log_every == 0:
            mean = self.sums["window_loss"] / self.sums["window_steps"]
            self._log(
                {"kind": "train", "step": self.step, "epoch": self.epoch, "loss": mean, "lr": lr}
            )
            self.sums["window_loss"], self.sums["window_steps"] = 0.0, 0

    def _end_epoch(self) -> None:
        self._lap("train")
        record: tracking.Record = {"kind": "eval", "epoch": self.epoch + 1, "step": self.step}
        steps = self.sums["epoch_steps"]
        record["train_loss"] = self.sums["epoch_loss"] / steps if steps else None
        last = self.epoch + 1 == self.config.epochs
        record["test_loss"] = record["test_acc"] = None
        if last or (self.epoch + 1) % self.config.eval_every == 0:
            record["test_loss"], record["test_acc"] = self._evaluate(self.data.test)
            if self.data.val is not None:
                record["val_loss"], record["val_acc"] = self._evaluate(self.data.val)
        self._lap("eval")
        record.update({f"{k}_seconds": v for k, v in self.seconds.items()})
        self._log(record)
        if self._quiet_bar:  # no progress bar: one line per epoch
            test = "" if record["test_acc"] is None else f", test acc {record['test_acc']:.4f}"
            print(
                f"{self.dir.name}: epoch {self.epoch + 1}/{self.config.epochs}, train loss "
                f"{record['train_loss']:.4f}{test}",
                file=sys.stderr,
                flush=True,
            )
        self.sums["epoch_loss"], self.sums["epoch_steps"] = 0.0, 0
        self.epoch += 1
        if (
            self.epoch % self.config.checkpoint_every_epochs == 0
            or self.epoch == self.config.epochs
            or self.epoch in self.config.snapshot_epochs
        ):
            self._checkpoint()
        if self.epoch in self.config.snapshot_epochs:
            self._save(self.dir / snapshot_file(self.epoch))

    def fixed_batches(self, count: int) -> list[tuple[Tensor, Tensor]]:
        """The first ``count`` batches of ``batch_size`` training samples, not augmented, on
        the run's device (fewer when the training set is smaller)."""
        train, size = self.data.train, self.config.batch_size
        stop = min(count * size, len(train))
        return [
            (train.images[i : i + size].to(self.device), train.labels[i : i + size].to(self.device))
            for i in range(0, stop, size)
        ]

    def final_sharpness(self) -> dict[str, Any]:
        """λ₁ (Lanczos, as in tracking) of the training loss at the current weights on a fixed
        batch: the first ``batch_size`` training samples, not augmented."""
        closure = make_closure(self.model, self.criterion, *self.fixed_batches(1)[0])
        assert self.probe is not None
        record, _, _ = self.probe.top_eigenpair(closure, self.model)
        return record

    def _finish(self) -> dict[str, Any]:
        """Final sharpness (when tracking), then curves, table and ``summary.json``."""
        config = self.config
        final = None
        if self.probe is not None:
            self._lap("train")
            final = self.final_sharpness()
            self._lap("track")
            self._log({"kind": "final_sharpness", "step": self.step, **final})
        last = [r for r in self.records if r["kind"] == "eval"][-1]
        tracks = [r for r in self.records if r["kind"] == "track"]
        steps = max(self.step, 1)
        summary = {
            "status": "finished",
            "run_dir": str(self.dir),
            "method": config.method,
            "seed": config.seed,
            "dataset": config.dataset,
            "model": config.model,
            "epochs": config.epochs,
            "steps": self.step,
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "hessian_parts": self.hessian_parts,
            "train_loss": last["train_loss"],
            "test_loss": last["test_loss"],
            "test_acc": last["test_acc"],
            "val_loss": last.get("val_loss"),
            "val_acc": last.get("val_acc"),
            "final_lambda1": None if final is None else final["lambda1"],
            "final_lambda1_relative_residual": None
            if final is None
            else final["relative_residual"],
            "last_tracked_lambda1": tracks[-1]["lambda1"] if tracks else None,
            "mean_align": mean_or_none([r["align"] for r in tracks if r["align"] is not None]),
            "mean_abs_cos": mean_or_none(
                [r["abs_cos"] for r in tracks if r["abs_cos"] is not None]
            ),
            "mean_fixed_align": mean_or_none(
                [r["fixed_align"] for r in tracks if r.get("fixed_align") is not None]
            ),
            "align_of": tracks[0]["align_of"] if tracks else None,
            "train_seconds": self.seconds["train"],
            "track_seconds": self.seconds["track"],
            "eval_seconds": self.seconds["eval"],
            "train_seconds_per_step": self.seconds["train"] / steps,
        }
        if self.ranks.main:
            title = f"{config.method} on {config.dataset} ({config.model}), seed {config.seed}"
            records = {config.method: [self.records]}
            tracking.plot_curves(records, self.dir / tracking.PLOT_FILE, title)
            table = tracking.summary_table({config.method: [summary]})
            tracking.write_text(self.dir / tracking.TABLE_FILE, f"# {title}\n\n{table}")
            tracking.write_json(self.dir / tracking.SUMMARY_FILE, summary)
        distributed.barrier()  # the other ranks may read the summary (compare) after this
        return summary


def train(
    config: TrainConfig,
    resume: Path | str | None = None,
    *,
    data: DataSplits | None = None,
    on_step: Callable[[Trainer], None] | None = None,
) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) one training run; return its summary
    (see :class:`Trainer`)."""
    return Trainer(config, resume, data).run(on_step)
