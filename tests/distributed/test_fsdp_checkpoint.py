"""Distributed checkpoints (torch.distributed.checkpoint) of SAM-family optimizers on FSDP2
models: resume bit for bit on 2 processes, and load on 1 process what 2 saved and back.
2 gloo processes on the CPU, float64."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from harness import run_ranks
from test_fsdp_optim import (
    build,
    full_params,
    global_batches,
    make_model,
    shard,
    shard_model,
    train,
)
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from eigensam.optim.checkpoint import distributed_state_dict, load_distributed_state_dict
from eigensam.parallel import ParamLayout

NAME = "x-sam"  # SGD with momentum (base state) and an eigenvector tracker (v̂, RNG)
FIRST, THEN = 3, 2  # steps before the checkpoint, steps after it


def state_of(model: nn.Module, opt: Any) -> dict[str, Any]:
    optim = distributed_state_dict(opt)  # first: it reshards a model left gathered
    return {"model": get_model_state_dict(model), "optim": optim}


def save(model: nn.Module, opt: Any, folder: Path) -> None:
    dcp.save(state_of(model, opt), checkpoint_id=str(folder))


def load(model: nn.Module, opt: Any, folder: Path) -> None:
    state = state_of(model, opt)
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    load_distributed_state_dict(opt, state["optim"])


def vector_of(model: nn.Module, opt: Any) -> torch.Tensor:
    return ParamLayout(list(model.parameters())).full(opt.tracker.vector)


def resume_worker(rank: int, world: int, folder: Path) -> None:
    batches = [shard(b, rank) for b in global_batches(FIRST + THEN)]
    model = shard_model(make_model())
    opt = build(NAME, model, sharded=True)
    train(opt, model, batches[:FIRST])
    with torch.no_grad():  # an evaluation leaves the root's gathered parameters registered
        model(batches[0][0])
    save(model, opt, folder / "two")
    train(opt, model, batches[FIRST:])
    torch.manual_seed(123)  # the resumed run starts from other weights and no state
    resumed = shard_model(make_model())
    resumed_opt = build(NAME, resumed, sharded=True, seed=7)
    load(resumed, resumed_opt, folder / "two")
    assert resumed_opt.sam_steps == FIRST
    train(resumed_opt, resumed, batches[FIRST:])
    for a, b in zip(full_params(model), full_params(resumed), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(vector_of(model, opt), vector_of(resumed, resumed_opt))
    assert torch.equal(opt.tracker.generator.get_state(), resumed_opt.tracker.generator.get_state())
    # From one process's checkpoint (written by the test before): 1 -> 2.
    one = shard_model(make_model())
    one_opt = build(NAME, one, sharded=True)
    load(one, one_opt, folder / "one")
    train(one_opt, one, batches[FIRST:])
    torch.save(
        {"two": full_params(model), "one->two": full_params(one), "v": vector_of(one, one_opt)},
        folder / f"result-rank{rank}.pt",
    )


def test_dcp_resumes_bit_for_bit_and_reshards(tmp_path: Path) -> None:
    batches = global_batches(FIRST + THEN)
    # One process: train, save (for 1 -> 2), continue: the reference.
    model = make_model()
    opt = build(NAME, model, sharded=False)
    train(opt, model, batches[:FIRST])
    save(model, opt, tmp_path / "one")
    train(opt, model, batches[FIRST:])
    run_ranks(resume_worker, tmp_path, timeout=240)
    results = [torch.load(tmp_path / f"result-rank{r}.pt") for r in range(2)]
    close = dict(rtol=1e-9, atol=1e-12)
    for r in results:
        for a, b in zip(r["one->two"], full_params(model), strict=True):
            torch.testing.assert_close(a, b, **close)
        torch.testing.assert_close(r["v"], opt.tracker.vector, **close)
        for a, b in zip(r["two"], full_params(model), strict=True):
            torch.testing.assert_close(a, b, **close)
    # 2 -> 1: one process loads what two saved, and continues as they did.
    single = make_model()
    single_opt = build(NAME, single, sharded=False)
    load(single, single_opt, tmp_path / "two")
    assert single_opt.tracker.backend == opt.tracker.backend
    train(single_opt, single, batches[FIRST:])
    for a, b in zip(full_params(single), results[0]["two"], strict=True):
        torch.testing.assert_close(a, b, **close)


def test_distributed_state_needs_a_sam_optimizer_with_its_model() -> None:
    model = make_model()
    with pytest.raises(TypeError, match="SAM-family optimizer.*got SGD"):
        distributed_state_dict(torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs the optimizer's model"):
        distributed_state_dict(build("sam", list(model.parameters()), sharded=False))
