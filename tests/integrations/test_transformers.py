"""SAMTrainer: the Hugging Face Trainer running eigensam optimizers, checked against
hand-written eigensam loops on the same batches."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason='the [hf] extra is not installed (pip install "eigensam[hf]")'
)
pytest.importorskip(
    "accelerate", reason='the [hf] extra is not installed (pip install "eigensam[hf]")'
)

from tiny_hf import (  # noqa: E402
    CONTEXT,
    TokenData,
    arguments,
    assert_same_training,
    eigen_sam,
    hand_loop,
    run_trainer,
    tiny_gpt,
)
from transformers import Trainer  # noqa: E402

from eigensam.hessian.closures import SplitClosure  # noqa: E402
from eigensam.integrations.transformers import (  # noqa: E402
    SAMTrainer,
    check_arguments,
    check_sequence_length,
)
from eigensam.optim import SAM  # noqa: E402

# hvp="auto" warns once per optimizer that GPT-2's SDPA attention gets finite-difference products.
pytestmark = pytest.mark.filterwarnings("ignore:hvp='auto'.*finite differences:RuntimeWarning")


@pytest.mark.parametrize(
    ("accumulation", "attention", "backend"),
    [(1, "sdpa", "fd-central"), (2, "sdpa", "fd-central"), (2, "eager", "autograd")],
)
def test_trainer_equals_hand_written_loop(
    tmp_path: Path, accumulation: int, attention: str, backend: str
) -> None:
    """hvp="auto": finite differences on SDPA attention; exact products on eager attention,
    which SAMTrainer sums over the micro-batches (the hand loop takes the whole group's)."""
    trainer = run_trainer(tmp_path, accumulation, attention=attention)
    assert len(trainer.seen) == 4 * accumulation
    model, opt, losses = hand_loop(trainer.seen, accumulation, steps=4, attention=attention)
    for a, b in zip(trainer.model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    sam = trainer.eigensam_optimizer
    assert sam.tracker.backend == opt.tracker.backend == backend
    step_closure = trainer._closure(trainer.model, trainer.seen[:accumulation], None)
    if accumulation > 1:  # exact products part by part: one micro-batch's graph at a time
        assert isinstance(step_closure, SplitClosure) and len(step_closure.parts) == 2
    assert sam.sam_steps == opt.sam_steps == 4
    assert sam.tracker.num_updates == opt.tracker.num_updates == 2  # steps 0 and 2
    torch.testing.assert_close(sam.tracker.vector, opt.tracker.vector, rtol=1e-4, atol=1e-5)
    # The loss logged each step is the first-pass loss of the accumulated batch.
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(losses, rel=1e-4)
    assert losses[-1] < losses[0]
    # The Trainer's linear schedule drove the eigensam optimizer's learning rate.
    assert sam.param_groups[0]["lr"] == pytest.approx(0.0)


def test_gradient_accumulation_equals_one_large_batch(tmp_path: Path) -> None:
    """Two micro-batches of 4 give the step of one batch of 8 (same samples)."""
    small = run_trainer(tmp_path / "small", accumulation=2)
    merged = [
        {k: torch.cat([a[k], b[k]]) for k in a}
        for a, b in zip(small.seen[0::2], small.seen[1::2], strict=True)
    ]
    model, _, _ = hand_loop(merged, accumulation=1, steps=4)
    for a, b in zip(small.model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_runs_both_passes_under_autocast(tmp_path: Path) -> None:
    trainer = run_trainer(tmp_path, accumulation=1, bf16=True)
    model, _, losses = hand_loop(trainer.seen, 1, steps=4, autocast=True)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(losses, rel=1e-6)
    for a, b in zip(trainer.model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The same loop in float32 ends measurably elsewhere: autocast was on.
    fp32, _, _ = hand_loop(trainer.seen, 1, steps=4, autocast=False)
    pairs = zip(fp32.parameters(), model.parameters(), strict=True)
    gap = max(float((a - b).detach().abs().max()) for a, b in pairs)
    assert gap > 1e-3


def test_max_grad_norm_clips_the_second_pass_gradient(tmp_path: Path) -> None:
    """SGD without momentum moves w by lr·clip(g'), so ‖Δw‖ = lr·max_grad_norm exactly when
    the second-pass gradient g' is longer than max_grad_norm."""
    model = tiny_gpt()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model, torch.optim.SGD, rho=0.05, lr=0.1)
    args = arguments(tmp_path, max_steps=1, max_grad_norm=1e-3, lr_scheduler_type="constant")
    trainer = SAMTrainer(model=model, args=args, train_dataset=TokenData(), optimizers=(opt, None))
    trainer.train()
    moved = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
    )
    assert float(moved.norm()) == pytest.approx(0.1 * 1e-3, rel=1e-3)
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(logged) == 1 and logged[0] > 1e-2  # the norm before clipping


def test_resume_from_checkpoint_is_bit_for_bit(tmp_path: Path) -> None:
    full = run_trainer(tmp_path / "full", 1, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["sam_steps"] == 2 and saved["tracker"]["vector"] is not None
    assert saved["base"]["state"]  # AdamW moments

    model = tiny_gpt(seed=5)  # weights come from the checkpoint
    opt = eigen_sam(model)
    args = arguments(tmp_path / "full", save_strategy="no")
    resumed = SAMTrainer(model=model, args=args, train_dataset=TokenData(), optimizers=(opt, None))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_same_training(full, model, opt)


def test_plain_trainer_refuses_an_eigensam_optimizer(tmp_path: Path) -> None:
    model = tiny_gpt()
    opt = eigen_sam(model)
    trainer = Trainer(
        model=model, args=arguments(tmp_path), train_dataset=TokenData(), optimizers=(opt, None)
    )
    with pytest.raises(TypeError, match="needs a closure"):
        trainer.train()


def test_sam_trainer_refuses_a_plain_optimizer(tmp_path: Path) -> None:
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match=r"optimizers=\(optimizer"):
        SAMTrainer(model=model, args=arguments(tmp_path), optimizers=(opt, None))
    with pytest.raises(TypeError, match="optimizers"):
        SAMTrainer(model=model, args=arguments(tmp_path))


def test_optimizer_built_on_another_model_is_refused(tmp_path: Path) -> None:
    opt = eigen_sam(tiny_gpt())
    with pytest.raises(ValueError, match="different module"):
        SAMTrainer(model=tiny_gpt(), args=arguments(tmp_path), optimizers=(opt, None))


def test_deepspeed_fsdp1_and_fp16_are_refused_naming_the_option(tmp_path: Path) -> None:
    # TrainingArguments(deepspeed=...) needs the deepspeed package; the check reads the field.
    with pytest.raises(ValueError, match=r"deepspeed='ds.json'.*not supported"):
        check_arguments(types.SimpleNamespace(deepspeed="ds.json"))
    fsdp1 = types.SimpleNamespace(fsdp=True, fsdp_config={"version": 1})
    with pytest.raises(ValueError, match=r"fsdp_config=\{'version': 1\}.*FSDP2"):
        check_arguments(fsdp1)
    check_arguments(types.SimpleNamespace(fsdp=True, fsdp_config={"version": 2}))
    model = tiny_gpt()
    opt = eigen_sam(model)
    with pytest.raises(ValueError, match=r"fp16=True.*bf16=True"):
        SAMTrainer(model=model, args=arguments(tmp_path, fp16=True), optimizers=(opt, None))


def test_sequence_longer_than_the_model_allows_is_refused(tmp_path: Path) -> None:
    long = torch.zeros(2, CONTEXT + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"input_ids has sequence length {CONTEXT + 1}"):
        check_sequence_length({"input_ids": long}, CONTEXT)
    check_sequence_length({"input_ids": long[:, :CONTEXT]}, CONTEXT)  # at the limit: fine

    class LongData(TokenData):
        def __getitem__(self, i):
            ids = torch.zeros(CONTEXT + 4, dtype=torch.long)
            return {"input_ids": ids, "labels": ids}

    model = tiny_gpt()
    trainer = SAMTrainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=LongData(),
        optimizers=(eigen_sam(model), None),
    )
    with pytest.raises(ValueError, match="longer than the model allows"):
        trainer.train()


def torchrun(worker: str, *args: object, ranks: int = 2) -> None:
    here = Path(__file__).parent
    src = Path(__file__).parents[2] / "src"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{here}{os.pathsep}{src}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*command, "--nproc_per_node", str(ranks), str(here / worker), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize(("accumulation", "fsdp"), [(1, False), (2, False), (1, True)])
def test_ddp_under_torchrun_equals_one_process_on_the_global_batch(
    tmp_path: Path, accumulation: int, fsdp: bool
) -> None:
    """Two ranks of batch 4 under torchrun: the ranks end identical, and equal to one process
    stepping on the samples of both ranks (Eigen-SAM's ε from the all-reduced gradient, its
    Hessian-vector products averaged over the ranks), with and without accumulation. On the
    CPU fsdp=True runs DDP (Accelerate enables FSDP only on accelerators), with a warning."""
    torchrun("ddp_trainer_worker.py", tmp_path, accumulation, int(fsdp))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["bound"] and ranks[1]["bound"]
    assert ranks[0]["warned"] == fsdp
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(ranks[0]["vector"], ranks[1]["vector"])
    # Micro-batch i of the global step: rank 0's and rank 1's micro-batch i side by side.
    merged = [
        {k: torch.cat([a[k], b[k]]) for k in a}
        for a, b in zip(ranks[0]["seen"], ranks[1]["seen"], strict=True)
    ]
    assert len(merged) == 3 * accumulation
    model, opt, _ = hand_loop(merged, accumulation, steps=3, schedule="constant", warmup=0)
    for a, b in zip(ranks[0]["params"], model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Finite-difference products divide rounding differences (rank-wise vs one-process sums) by
    # the small step h: v̂ agrees to 1e-4 where the weights agree to 1e-5.
    torch.testing.assert_close(ranks[0]["vector"], opt.tracker.vector, rtol=1e-4, atol=1e-4)


# Up to 2 GPUs with CUDA; else 2 CPU processes, where the worker switches Accelerate to FSDP2
# (Accelerate enables FSDP only on accelerators).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FSDP_RANKS = min(torch.cuda.device_count(), 2) if DEVICE == "cuda" else 2


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_fsdp2_equals_one_process_on_the_global_batch(tmp_path: Path, accumulation: int) -> None:
    """fsdp=True, batch 4 per rank: the model is sharded in train(), the optimizer takes up the
    shards, and the gathered weights and v̂ equal one process stepping on the samples of every
    rank (Eigen-SAM's ε from the global gradient norm, its finite-difference products on the
    global gradients)."""
    torchrun("fsdp_trainer_worker.py", tmp_path, accumulation, ranks=FSDP_RANKS)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(FSDP_RANKS)]
    assert saved[0]["sharded"] and saved[0]["steps"] == 4
    merged = [
        {k: torch.cat([r["seen"][i][k] for r in saved]) for k in saved[0]["seen"][i]}
        for i in range(len(saved[0]["seen"]))
    ]
    assert len(merged) == 4 * accumulation
    model, opt, _ = hand_loop(
        merged, accumulation, steps=4, schedule="constant", warmup=0, device=DEVICE
    )
    for a, b in zip(saved[0]["params"], model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach().cpu(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(saved[0]["vector"], opt.tracker.vector.cpu(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fsdp2_resume_from_checkpoint_continues_bit_for_bit(tmp_path: Path) -> None:
    """A run resumed from its step-2 checkpoint (the Trainer's FSDP model checkpoint, the
    eigensam optimizer's sharded state through DCP) ends with the weights and v̂ of the
    uninterrupted 4-step run: bit for bit on the CPU."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    torchrun("fsdp_trainer_worker.py", whole, 1, ranks=FSDP_RANKS)
    checkpoint = whole / "out" / "checkpoint-2"
    assert (checkpoint / "eigensam_optimizer").is_dir()
    torchrun("fsdp_trainer_worker.py", resumed, 1, checkpoint, ranks=FSDP_RANKS)
    a, b = (torch.load(d / "rank0.pt", weights_only=True) for d in (whole, resumed))
    assert b["steps"] == 4 and len(b["seen"]) == 2
    tolerance = {"rtol": 0.0, "atol": 0.0} if DEVICE == "cpu" else {}
    for x, y in zip([*a["params"], a["vector"]], [*b["params"], b["vector"]], strict=True):
        torch.testing.assert_close(x, y, **tolerance)


def test_attach_ddp_equals_building_the_optimizer_on_the_wrapper(tmp_path: Path) -> None:
    """SAMTrainer hands the DDP wrapper to an optimizer built on the bare model; that must set
    up what building it on the wrapper does (one-process gloo group), step for step."""
    dist = pytest.importorskip("torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        built_model, attached_model = tiny_gpt(), tiny_gpt()
        built_ddp = torch.nn.parallel.DistributedDataParallel(built_model)
        attached_ddp = torch.nn.parallel.DistributedDataParallel(attached_model)
        built = eigen_sam(built_ddp)
        attached = eigen_sam(attached_model)
        assert attached.ddp is None and attached.reduce is None
        attached.attach_ddp(attached_ddp)
        assert attached.ddp is attached_ddp and attached.model is attached_model
        assert type(attached.reduce) is type(built.reduce)
        assert attached.tracker.reduce is attached.reduce
        assert attached._ranks_checked is built._ranks_checked is False
        batch = TokenData()[0]
        inputs = {k: v.unsqueeze(0).repeat(4, 1) for k, v in batch.items()}
        for opt, wrapper in ((built, built_ddp), (attached, attached_ddp)):
            for _ in range(2):

                def closure(wrapper=wrapper):
                    loss = wrapper(**inputs).loss
                    loss.backward()
                    return loss

                opt.step(closure)
        for a, b in zip(built_model.parameters(), attached_model.parameters(), strict=True):
            assert torch.equal(a, b)
        with pytest.raises(ValueError, match="different module"):
            eigen_sam(tiny_gpt()).attach_ddp(attached_ddp)
    finally:
        dist.destroy_process_group()
