"""A tiny GPT-2 built from a config, a learnable token task, and the hand-written eigensam loop
the SAMTrainer tests compare against (shared by the tests and the torchrun worker)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from eigensam.integrations.transformers import SAMTrainer
from eigensam.optim import EigenSAM

VOCAB, CONTEXT = 64, 16


def tiny_gpt(seed: int = 0, attention: str = "sdpa") -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=CONTEXT,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    config._attn_implementation = attention  # "eager" supports double backward
    model = GPT2LMHeadModel(config)
    # GPT2LMHeadModel's class name matches no loss type, so the Trainer would count all T labels
    # of a row in num_items_in_batch instead of the T - 1 the shifted loss sums (its logged loss
    # would be (T-1)/T of the mean); name the loss so the Trainer counts as the model sums.
    model.loss_type = "ForCausalLM"
    return model


class TokenData(torch.utils.data.Dataset):
    """Sequences of a repeating pattern plus noise: a learnable next-token task."""

    def __init__(self, n: int = 32, length: int = CONTEXT):
        g = torch.Generator().manual_seed(1)
        base = torch.arange(length) % 7
        self.ids = (base + torch.randint(0, 3, (n, 1), generator=g)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(tmp_path: Path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=4,
        lr_scheduler_type="linear",
        warmup_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        max_grad_norm=0.0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**options, **overrides})


def eigen_sam(model: torch.nn.Module) -> EigenSAM:
    # hvp="auto" (default): GPT-2's attention runs F.scaled_dot_product_attention, whose CPU
    # kernel has no double backward, so the products are central finite differences.
    return EigenSAM(
        model,
        torch.optim.AdamW,
        rho=0.05,
        lr=3e-3,
        weight_decay=0.01,
        eig_interval=2,
        eig_iters=2,
    )


class RecordingTrainer(SAMTrainer):
    """Records the micro-batches the Trainer feeds, in order."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def recording_trainer(
    folder: Path, accumulation: int, attention: str = "sdpa", **overrides
) -> RecordingTrainer:
    """A RecordingTrainer with Eigen-SAM (``trainer.eigensam_optimizer``) on a fresh tiny GPT-2
    and the token task, with :func:`arguments` and ``overrides``; not trained yet."""
    model = tiny_gpt(attention=attention)
    args = arguments(folder, gradient_accumulation_steps=accumulation, **overrides)
    trainer = RecordingTrainer(
        model=model, args=args, train_dataset=TokenData(), optimizers=(eigen_sam(model), None)
    )
    trainer.seen = []
    return trainer


def run_trainer(
    tmp_path: Path, accumulation: int, attention: str = "sdpa", **overrides
) -> RecordingTrainer:
    trainer = recording_trainer(tmp_path, accumulation, attention, **overrides)
    trainer.train()
    return trainer


def hand_loop(
    batches,
    accumulation: int,
    steps: int,
    autocast: bool = False,
    schedule: str = "linear",
    warmup: int = 1,
    attention: str = "sdpa",
    device: str = "cpu",
):
    """The eigensam loop a user would write: one ``opt.step(closure)`` per accumulation group,
    the closure summing the micro-batches' mean losses / k (on ``device``)."""
    model = tiny_gpt(attention=attention).to(device)
    opt = eigen_sam(model)
    scheduler = transformers.get_scheduler(
        schedule, opt, num_warmup_steps=warmup, num_training_steps=steps
    )
    losses = []
    for step in range(steps):
        group = batches[step * accumulation : (step + 1) * accumulation]

        def closure(group=group):
            total = torch.zeros((), device=device)
            for batch in group:
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = model(**batch).loss.float() / len(group)
                loss.backward()
                total = total + loss.detach()
            return total

        model.train()
        losses.append(float(opt.step(closure)))
        scheduler.step()
    return model, opt, losses


def assert_same_training(full, model: torch.nn.Module, opt: EigenSAM) -> None:
    """``model`` and ``opt`` (resumed from a checkpoint of ``full``, a finished 4-step trainer)
    equal ``full``'s bit for bit: weights, step count, v̂ and AdamW's second moments."""
    for a, b in zip(full.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.sam_steps == 4
    assert torch.equal(opt.tracker.vector, full.eigensam_optimizer.tracker.vector)
    state = opt.base_optimizer.state_dict()["state"]
    reference = full.eigensam_optimizer.base_optimizer.state_dict()["state"]
    assert state.keys() == reference.keys()
    for key in reference:
        assert torch.equal(state[key]["exp_avg_sq"], reference[key]["exp_avg_sq"])
