"""What EigenSAM and SAM cost on a LoRA model against full fine-tuning.

A GPT-2 built from a config (``--n-embd`` 128, ``--n-layer`` 4, 4 heads, vocabulary 256,
context 64; eager attention, so Hessian-vector products are exact double backward) trained on a
batch of 8 random token sequences, in two settings:

- full: every weight trainable;
- LoRA: PEFT rank-8 adapters on the attention and MLP projections (``c_attn``, ``c_proj``,
  ``c_fc``), the base model frozen; the optimizer is built on the PEFT model, which gives it the
  trainable (adapter) parameters only.

For AdamW, SAM and EigenSAM (base AdamW; refresh every 5 steps with 5 products, the paper's
q = 5 at a short interval so the refresh shows in the mean): the trained parameters, the bytes
of the optimizer's state (AdamW moments, plus v̂ for EigenSAM) and the mean seconds per step
over ``--steps`` steps after 2 warm-up steps. The settings are interleaved per repeat; medians
over ``--repeats``. The table is printed and saved to ``benchmarks/results/lora.json`` and
``.md`` (``--out``; see ``tables.py``), which docs/transformers.md includes. Run:

    pip install "eigensam[hf]"
    python benchmarks/bench_lora.py [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import peft
import torch
from tables import RESULTS, new_report, publish
from transformers import GPT2Config, GPT2LMHeadModel

from eigensam.optim import SAM, EigenSAM

VOCAB, CONTEXT, BATCH = 256, 64, 8
PLAIN = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)


def model(args: argparse.Namespace, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    size = dict(n_embd=args.n_embd, n_layer=args.n_layer, n_head=4)
    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, **size, **PLAIN)
    config._attn_implementation = "eager"
    gpt = GPT2LMHeadModel(config)
    if not lora:
        return gpt
    adapters = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        lora_dropout=0.0,
    )
    return peft.get_peft_model(gpt, adapters)


def optimizer(name: str, net: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    if name == "SAM":
        return SAM(net, torch.optim.AdamW, rho=0.05, lr=1e-3)
    return EigenSAM(net, torch.optim.AdamW, rho=0.05, lr=1e-3, eig_interval=5, eig_iters=5)


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """Bytes of the base optimizer's tensors and of v̂."""
    base = getattr(opt, "base_optimizer", opt)
    moments = sum(
        t.numel() * t.element_size()
        for state in base.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    tracker = getattr(opt, "tracker", None)
    vector = 0 if tracker is None or tracker.vector is None else tracker.vector.numel() * 4
    return moments, vector


def run(args: argparse.Namespace, lora: bool, name: str) -> dict[str, float]:
    net = model(args, lora)
    net.train()
    opt = optimizer(name, net)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=g)

    def closure() -> torch.Tensor:
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    def step() -> None:
        if name == "AdamW":
            opt.zero_grad()
            closure()
            opt.step()
        else:
            opt.step(closure)

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    moments, vector = state_bytes(opt)
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"trained": trained, "moments": moments, "vector": vector, "seconds": seconds}


COLUMNS = {
    "model": "model",
    "optimizer": "optimizer",
    "trained": "trained params",
    "moments_mib": "AdamW state (MiB)",
    "vector_mib": "v̂ (MiB)",
    "seconds": "s/step",
    "vs_adamw": "/ AdamW's s/step",
}
FORMATS = {
    "trained": ",",
    "moments_mib": ".2f",
    "vector_mib": ".3f",
    "seconds": ".3f",
    "vs_adamw": ".2f",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in [("--n-embd", 128), ("--n-layer", 4), ("--steps", 10), ("--repeats", 3)]:
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--out", type=Path, default=RESULTS / "lora.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    report = new_report(parser, args, threads=1)
    settings = [(lora, name) for lora in (False, True) for name in ("AdamW", "SAM", "EigenSAM")]
    results: dict[tuple[bool, str], list[dict[str, float]]] = {s: [] for s in settings}
    for _ in range(args.repeats):
        for lora, name in settings:
            results[(lora, name)].append(run(args, lora, name))
    rows = []
    for lora in (False, True):
        adamw = statistics.median(r["seconds"] for r in results[(lora, "AdamW")])
        for name in ("AdamW", "SAM", "EigenSAM"):
            first = results[(lora, name)][0]
            seconds = statistics.median(r["seconds"] for r in results[(lora, name)])
            rows.append(
                {
                    "model": "LoRA r=8" if lora else "full",
                    "optimizer": name,
                    "trained": first["trained"],
                    "moments_mib": first["moments"] / 2**20,
                    "vector_mib": first["vector"] / 2**20,
                    "seconds": seconds,
                    "vs_adamw": seconds / adamw,
                }
            )
    total = sum(p.numel() for p in model(args, False).parameters())
    setting = (
        f"GPT-2 of {args.n_embd} dimensions and {args.n_layer} layers ({total:,} parameters, "
        f"float32), batch {BATCH} × {CONTEXT} tokens; mean s/step over {args.steps} steps, "
        f"median of {args.repeats} repeats."
    )
    publish(report, args.out, start, {"lora": (COLUMNS, rows)}, FORMATS, {"setting": setting})


if __name__ == "__main__":
    main()
