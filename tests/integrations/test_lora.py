"""EigenSAM and SAM on a PEFT LoRA model inside SAMTrainer: the optimizer's state and v̂ cover
the adapters only, the frozen base model does not move, and resuming is bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "transformers", reason='the [hf] extra is not installed (pip install "eigensam[hf]")'
)
pytest.importorskip(
    "accelerate", reason='the [hf] extra is not installed (pip install "eigensam[hf]")'
)
peft = pytest.importorskip(
    "peft", reason='the [hf] extra is not installed (pip install "eigensam[hf]")'
)

from tiny_hf import TokenData, arguments, assert_same_training, tiny_gpt  # noqa: E402

from eigensam.integrations.transformers import SAMTrainer  # noqa: E402
from eigensam.optim import SAM, EigenSAM  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:hvp='auto'.*finite differences:RuntimeWarning"),
    # peft asks transformers the deprecated is_gradient_checkpointing (transformers 5)
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


def lora_gpt(seed: int = 0) -> torch.nn.Module:
    """The tiny GPT-2 (base weights from seed 0) with rank-4 LoRA adapters on its attention
    projections; the adapters' B matrices start at ``seed``'s random values (PEFT's zeros would
    make the first steps degenerate)."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0
    )
    model = peft.get_peft_model(tiny_gpt(seed=0), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def optimizer(kind: str, model: torch.nn.Module) -> SAM:
    if kind == "sam":
        return SAM(model, torch.optim.AdamW, rho=0.05, lr=3e-3)
    return EigenSAM(model, torch.optim.AdamW, rho=0.05, lr=3e-3, eig_interval=2, eig_iters=2)


def trained(folder: Path, kind: str, **overrides) -> SAMTrainer:
    model = lora_gpt()
    trainer = SAMTrainer(
        model=model,
        args=arguments(folder, **overrides),
        train_dataset=TokenData(),
        optimizers=(optimizer(kind, model), None),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", ["sam", "eigen-sam"])
def test_state_and_vhat_cover_only_the_adapters(tmp_path: Path, kind: str) -> None:
    base = {n: p.detach().clone() for n, p in lora_gpt().named_parameters()}
    trainer = trained(tmp_path, kind)
    model, opt = trainer.model, trainer.eigensam_optimizer
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(p.requires_grad for p in adapters)
    assert [p for g in opt.param_groups for p in g["params"]] == adapters
    assert set(opt.base_optimizer.state) == set(adapters)  # AdamW moments of adapters only
    for name, p in model.named_parameters():
        moved = not torch.equal(p, base[name])
        assert moved == ("lora_" in name), name  # the base model stays frozen
    if kind == "eigen-sam":
        assert opt.tracker.vector.numel() == sum(p.numel() for p in adapters)
        assert opt.tracker.vector.numel() < sum(p.numel() for p in model.parameters()) / 10


def test_resume_from_checkpoint_is_bit_for_bit(tmp_path: Path) -> None:
    full = trained(tmp_path / "full", "eigen-sam", save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    model = lora_gpt(seed=7)  # the adapters come from the checkpoint
    opt = optimizer("eigen-sam", model)
    args = arguments(tmp_path / "full", save_strategy="no")
    resumed = SAMTrainer(model=model, args=args, train_dataset=TokenData(), optimizers=(opt, None))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_same_training(full, model, opt)
