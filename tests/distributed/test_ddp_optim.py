"""SAM, Eigen-SAM and X-SAM under DistributedDataParallel: 2 gloo processes on the CPU.

Ground truth: a single process on the concatenated batch (``sharpness="global"``) and a
single-process simulation that perturbs each shard with its own gradient and averages the
second-pass gradients (``sharpness="local"``, m-sharpness), written out here with autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from eigensam import SAM, XSAM, EigenSAM
from eigensam.hessian.hvp import HessianOperator
from eigensam.hessian.tracker import EigenTracker
from eigensam.optim import EGR
from eigensam.parallel import MeanAcrossRanks

STEPS = 3
WORLD = 2
SGD = torch.optim.SGD
TRACKED = dict(alpha=0.5, eig_interval=2, eig_iters=4)
OPTIMIZERS: dict[str, Callable[..., Any]] = {
    "sam": lambda model, **kw: SAM(model, SGD, 0.1, lr=0.1, momentum=0.9, **kw),
    "eigen-sam": lambda model, **kw: EigenSAM(model, SGD, 0.1, **TRACKED, lr=0.1, **kw),
    "x-sam": lambda model, **kw: XSAM(
        model, SGD, 0.1, **{**TRACKED, "alpha": 1.0}, lr=0.1, momentum=0.9, **kw
    ),
    "eigen-sam/fd-central": lambda model, **kw: EigenSAM(
        model, SGD, 0.1, **TRACKED, hvp="fd-central", lr=0.1, **kw
    ),
    "egr/fd-forward": lambda model, **kw: EGR(model, SGD, 0.1, hvp="fd-forward", lr=0.1, **kw),
    "eigen-sam/averaged": lambda model, **kw: EigenSAM(
        model, SGD, 0.1, **TRACKED, eig_estimator="averaged", lr=0.1, **kw
    ),
    "x-sam/secant": lambda model, **kw: XSAM(
        model, SGD, 0.1, **{**TRACKED, "alpha": 1.0}, eig_estimator="secant", lr=0.1, **kw
    ),
}


def make_model(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(8)] if batchnorm else []
    return nn.Sequential(nn.Linear(6, 8), *norm, nn.Tanh(), nn.Linear(8, 3)).double()


def global_batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(16, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (16,), generator=g),
        )
        for _ in range(steps)
    ]


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, ...]:
    return tuple(t.chunk(WORLD)[rank] for t in batch)


def train(opt: SAM, model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> None:
    for x, y in batches:

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------------------------
# workers (run on every rank)


def global_worker(rank: int, world: int, folder: Path) -> None:
    results = {}
    for name, build in OPTIMIZERS.items():
        module = make_model()
        ddp = DDP(module)
        opt = build(ddp)
        train(opt, ddp, [shard(b, rank) for b in global_batches()])
        tracker = getattr(opt, "tracker", None)
        results[name] = {
            "params": params_of(module),
            "vector": None if tracker is None else tracker.vector,
        }
    torch.save(results, folder / f"global-rank{rank}.pt")
    resume_check(rank, folder)


def resume_check(rank: int, folder: Path) -> None:
    """Rank 0 saves model and optimizer; every rank loads that file and continues bit for bit."""
    module = make_model()
    ddp = DDP(module)
    opt = OPTIMIZERS["x-sam"](ddp)
    batches = [shard(b, rank) for b in global_batches(5)]
    train(opt, ddp, batches[:3])
    if rank == 0:
        torch.save({"model": module.state_dict(), "opt": opt.state_dict()}, folder / "ckpt.pt")
    dist.barrier()
    train(opt, ddp, batches[3:])
    state = torch.load(folder / "ckpt.pt", weights_only=False)
    resumed = make_model()
    resumed.load_state_dict(state["model"])
    resumed_ddp = DDP(resumed)
    resumed_opt = OPTIMIZERS["x-sam"](resumed_ddp)
    resumed_opt.load_state_dict(state["opt"])
    train(resumed_opt, resumed_ddp, batches[3:])
    for a, b in zip(module.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.tracker.vector, resumed_opt.tracker.vector)


def batchnorm_worker(rank: int, world: int, folder: Path) -> None:
    """BatchNorm under DDP: after a step (with an eigenvector refresh) the running statistics
    are those of one forward pass on this rank's shard; weights are identical on the ranks."""
    module = make_model(batchnorm=True)
    ddp = DDP(module)
    opt = OPTIMIZERS["eigen-sam"](ddp)
    x, y = shard(global_batches(1)[0], rank)
    train(opt, ddp, [(x, y)])
    reference = make_model(batchnorm=True)
    reference(x)
    for (name, a), b in zip(module.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(a, b), name
    torch.save(params_of(module), folder / f"bn-rank{rank}.pt")


def local_worker(rank: int, world: int, folder: Path) -> None:
    results = {}
    for name in ("sam", "eigen-sam"):
        module = make_model()
        ddp = DDP(module)
        opt = OPTIMIZERS[name](ddp, sharpness="local")
        opt.param_groups[0]["momentum"] = 0.0
        train(opt, ddp, [shard(b, rank) for b in global_batches(2)])
        tracker = getattr(opt, "tracker", None)
        results[name] = {
            "params": params_of(module),
            "vector": None if tracker is None else tracker.vector,
        }
    torch.save(results, folder / f"local-rank{rank}.pt")


def mismatch_worker(rank: int, world: int, folder: Path) -> None:
    """Ranks that disagree raise ValueError on every rank (the group stays usable)."""
    x, y = shard(global_batches(1)[0], rank)
    ddp = DDP(make_model())
    opt = SAM(ddp, SGD, rho=0.05 * (rank + 1), lr=0.1)
    with pytest.raises(ValueError, match="ranks disagree on the optimizer configuration.*rho"):
        train(opt, ddp, [(x, y)])
    params = list(ddp.parameters())
    opt = EigenSAM(params[: len(params) - rank], SGD, model=ddp, lr=0.1)
    with pytest.raises(ValueError, match="ranks disagree on the optimizer configuration"):
        train(opt, ddp, [(x, y)])
    opt = EigenSAM(ddp, SGD, lr=0.1, eig_interval=10 + rank)
    with pytest.raises(ValueError, match=r"disagree on the optimizer.*refresh.*\(10, 2"):
        train(opt, ddp, [(x, y)])
    reduce = MeanAcrossRanks()
    with pytest.raises(ValueError, match=r"ranks disagree on the length.*rank 1: 4"):
        reduce(torch.ones(3 + rank))
    assert torch.equal(reduce(torch.full((2,), float(rank))), torch.full((2,), 0.5))


# --------------------------------------------------------------------------------------------
# single-process ground truth


def simulate_local(name: str) -> dict[str, Any]:
    """m-sharpness by hand: each shard's ascent from its own gradient (SAM: ρĝ_r, Eigen-SAM:
    ρ(ĝ_r + α·sign(⟨g_r, v̂⟩)·v̂⊥_r) with the global v̂, paper Eq. 7-8), the second-pass
    gradients averaged, plain SGD."""
    model = make_model()
    params = list(model.parameters())
    tracker = EigenTracker(TRACKED["eig_interval"], TRACKED["eig_iters"])
    for step, batch in enumerate(global_batches(2)):
        if name == "eigen-sam" and tracker.due(step):
            x, y = batch

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            tracker.update(closure, params, model)
        total = [torch.zeros_like(p) for p in params]
        for rank in range(WORLD):
            x, y = shard(batch, rank)
            g = torch.cat(
                [t.reshape(-1) for t in torch.autograd.grad(loss_of(model, x, y), params)]
            )
            g_hat = g / g.norm()
            direction = g_hat
            if name == "eigen-sam":
                v = tracker.vector
                sign = 1.0 if float(g @ v) >= 0 else -1.0
                direction = g_hat + TRACKED["alpha"] * sign * (v - (v @ g_hat) * g_hat)
            eps = [
                0.1 * d.view_as(p) for d, p in zip(split(direction, params), params, strict=True)
            ]
            with torch.no_grad():
                torch._foreach_add_(params, eps)
            second = torch.autograd.grad(loss_of(model, x, y), params)
            with torch.no_grad():
                torch._foreach_sub_(params, eps)
            torch._foreach_add_(total, [s / WORLD for s in second])
        with torch.no_grad():
            torch._foreach_add_(params, total, alpha=-0.1)
    return {"params": params_of(model), "vector": tracker.vector}


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(flat.split([p.numel() for p in like]))


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# tests


def test_global_sharpness_equals_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    run_ranks(global_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"global-rank{r}.pt") for r in range(WORLD)]
    for name, build in OPTIMIZERS.items():
        model = make_model()
        opt = build(model)
        train(opt, model, global_batches())
        assert_close(ranks[0][name]["params"], params_of(model))
        for other in ranks[1:]:
            for a, b in zip(ranks[0][name]["params"], other[name]["params"], strict=True):
                assert torch.equal(a, b), name
        if "sam" in name and name != "sam":  # v̂ is global: the same on every rank, bit for bit
            assert all(torch.equal(ranks[0][name]["vector"], r[name]["vector"]) for r in ranks)
            torch.testing.assert_close(ranks[0][name]["vector"], opt.tracker.vector)
    # The Eigen-SAM and X-SAM corrections changed the trajectory (the test can tell them apart).
    sam = ranks[0]["sam"]["params"][0]
    assert not torch.allclose(sam, ranks[0]["x-sam"]["params"][0], rtol=1e-6)


def test_local_sharpness_equals_per_shard_simulation(tmp_path: Path) -> None:
    run_ranks(local_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"local-rank{r}.pt") for r in range(WORLD)]
    for name in ("sam", "eigen-sam"):
        expected = simulate_local(name)
        for r in ranks:
            assert_close(r[name]["params"], expected["params"])
        if name == "eigen-sam":
            assert torch.equal(ranks[0][name]["vector"], ranks[1][name]["vector"])
            torch.testing.assert_close(ranks[0][name]["vector"], expected["vector"])
    # m-sharpness is a different algorithm from the global one on the same data.
    model = make_model()
    opt = OPTIMIZERS["sam"](model)
    opt.param_groups[0]["momentum"] = 0.0
    train(opt, model, global_batches(2))
    assert not torch.allclose(params_of(model)[0], ranks[0]["sam"]["params"][0], rtol=1e-6)


def test_batchnorm_buffers_protected_under_ddp(tmp_path: Path) -> None:
    run_ranks(batchnorm_worker, tmp_path)
    a, b = (torch.load(tmp_path / f"bn-rank{r}.pt") for r in range(WORLD))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_ranks_that_disagree_fail_fast(tmp_path: Path) -> None:
    run_ranks(mismatch_worker, tmp_path)


# --------------------------------------------------------------------------------------------
# bad input in one process


@pytest.fixture
def one_process_group(tmp_path: Path):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path}/store",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=30),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sharpness_must_be_global_or_local() -> None:
    with pytest.raises(ValueError, match=r"sharpness must be one of \('global', 'local'\), got"):
        SAM(make_model(), SGD, lr=0.1, sharpness="m")


def test_local_sharpness_needs_a_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="sharpness='local' needs an initialized torch.distrib"):
        EigenSAM(make_model(), SGD, lr=0.1, sharpness="local")


def test_local_sharpness_needs_the_ddp_wrapper(one_process_group: None) -> None:
    with pytest.raises(TypeError, match="needs the DistributedDataParallel model.*Sequential"):
        SAM(make_model(), SGD, lr=0.1, sharpness="local")
    with pytest.raises(ValueError, match="sharpness='local' is not defined for EGR"):
        EGR(DDP(make_model()), SGD, lr=0.1, sharpness="local")


def test_hessian_operator_refuses_the_ddp_wrapper(one_process_group: None) -> None:
    ddp = DDP(make_model())
    with pytest.raises(TypeError, match="DistributedDataParallel wrapper; pass its .module"):
        HessianOperator(lambda: torch.zeros(()), ddp.parameters(), model=ddp)


def test_reduce_applies_to_products_and_gradient() -> None:
    """``reduce`` maps each returned product and the gradient; the finite-difference products
    are built from the local gradient (fd-forward: (∇L(w + hv) − ∇L(w))/h, then reduced)."""
    model = make_model()
    x, y = global_batches(1)[0]
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for backend in ("autograd", "fd-forward", "fd-central"):
        with HessianOperator(closure, params, backend=backend) as op:
            plain, grad = op.matvec(v), op.gradient()
        reduce = lambda t: 3 * t  # noqa: E731
        with HessianOperator(closure, params, backend=backend, reduce=reduce) as op:
            assert torch.equal(op.matvec(v), 3 * plain), backend
            assert torch.equal(op.gradient(), 3 * grad), backend


def test_one_process_ddp_is_the_plain_optimizer(one_process_group: None) -> None:
    """World size 1: the DDP path (local forward, reduce) gives the plain run bit for bit."""
    for name, build in OPTIMIZERS.items():
        plain, wrapped = make_model(), make_model()
        ddp = DDP(wrapped)
        train(build(plain), plain, global_batches())
        train(build(ddp), ddp, global_batches())
        for a, b in zip(params_of(plain), params_of(wrapped), strict=True):
            assert torch.equal(a, b), name
