"""Eigen-SAM in the Hugging Face Trainer: a tiny randomly initialized GPT-2 (built from a config,
no download) learns to predict the bytes of the Python standard library's source files.

    pip install 'eigensam[hf,lab]'
    python examples/hf_trainer_eigensam.py [--steps 80]

About a minute on a CPU; the training loss falls from ln 256 ≈ 5.5 nats/byte.
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from eigensam import EigenSAM
from eigensam.integrations.transformers import SAMTrainer
from eigensam.lab.workloads.text import VOCAB_SIZE, ByteWindows, load_corpus

CONTEXT = 64


def build_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=CONTEXT,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # so the Trainer counts the T - 1 shifted labels of a row
    return model


def train(steps: int = 80, output_dir: str | None = None) -> SAMTrainer:
    corpus = load_corpus(max_bytes=400_000)
    train_data = ByteWindows(corpus.train, CONTEXT, hf=True)
    eval_data = torch.utils.data.Subset(ByteWindows(corpus.validation, CONTEXT, hf=True), range(64))
    model = build_model()
    # Eigen-SAM around AdamW; hvp="auto" picks finite-difference Hessian-vector products,
    # since GPT-2's scaled_dot_product_attention has no double backward on CPU.
    opt = EigenSAM(model, torch.optim.AdamW, rho=0.05, lr=2e-3, weight_decay=0.01, eig_interval=20)
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="hf-eigensam-"),
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        max_steps=steps,
        warmup_steps=5,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SAMTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        optimizers=(opt, None),  # the Trainer creates the cosine schedule on Eigen-SAM
    )
    trainer.train()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    steps = parser.parse_args().steps
    trainer = train(steps)
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    print(f"initial loss ≈ ln 256 = {math.log(256):.3f} nats/byte")
    for step, loss in losses:
        print(f"step {step:4d}  train loss {loss:.3f}")
    evaluation = trainer.evaluate()
    print(f"validation loss {evaluation['eval_loss']:.3f} nats/byte")
    tracker = trainer.eigensam_optimizer.tracker
    print(
        f"Eigen-SAM: {tracker.num_updates} eigenvector refreshes ({tracker.backend}), "
        f"last λ₁ estimate {tracker.eigenvalue:.3g}"
    )


if __name__ == "__main__":
    main()
