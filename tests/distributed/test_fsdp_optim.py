"""SAM, ASAM, Reverse-SAM, Eigen-SAM and X-SAM on FSDP2 (``fully_shard``) models: 2 gloo
processes on the CPU, float64.

Ground truth: one process with the whole model on the concatenated batch (FSDP2's gradients are
the global batch's, so the global-sharpness algorithm is the same), with the finite-difference
backend that ``hvp="auto"`` picks under FSDP2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from eigensam import SAM, XSAM, EigenSAM
from eigensam.hessian.hvp import FD_FALLBACK, HessianOperator
from eigensam.optim import EGR, ReverseSAM
from eigensam.parallel import ParamLayout

STEPS = 3
WORLD = 2
SGD = torch.optim.SGD
TRACKED = dict(alpha=0.5, eig_interval=2, eig_iters=4)
Build = Callable[..., Any]
OPTIMIZERS: dict[str, Build] = {
    "sam": lambda model, **kw: SAM(model, SGD, 0.1, lr=0.1, momentum=0.9, **kw),
    "asam": lambda model, **kw: SAM(model, SGD, 0.5, adaptive=True, eta=0.01, lr=0.1, **kw),
    "reverse-sam": lambda model, **kw: ReverseSAM(model, SGD, 0.1, lr=0.1, **kw),
    "sam/adamw": lambda model, **kw: SAM(model, torch.optim.AdamW, 0.1, lr=0.01, **kw),
    "eigen-sam": lambda model, **kw: EigenSAM(model, SGD, 0.1, **TRACKED, lr=0.1, **kw),
    "eigen-sam/lanczos": lambda model, **kw: EigenSAM(
        model, SGD, 0.1, **TRACKED, eig_method="lanczos", lr=0.1, **kw
    ),
    "x-sam": lambda model, **kw: XSAM(
        model, SGD, 0.1, **{**TRACKED, "alpha": 1.0}, lr=0.1, momentum=0.9, **kw
    ),
    "egr": lambda model, **kw: EGR(model, SGD, 0.1, lr=0.1, **kw),
    "eigen-sam/averaged": lambda model, **kw: EigenSAM(
        model, SGD, 0.1, **TRACKED, eig_estimator="averaged", lr=0.1, **kw
    ),
    "x-sam/secant": lambda model, **kw: XSAM(
        model, SGD, 0.1, **{**TRACKED, "alpha": 1.0}, eig_estimator="secant", lr=0.1, **kw
    ),
}
TRACKED_NAMES = ("eigen-sam", "eigen-sam/lanczos", "x-sam", "eigen-sam/averaged", "x-sam/secant")
FD_NAMES = (*TRACKED_NAMES, "egr")  # their products are finite differences under FSDP2
ATTACHED = ("sam", "eigen-sam")  # built before fully_shard, then attach_fsdp()


def make_model() -> nn.Module:
    """Row counts 7, 9 and 3: uneven shards at 2 ranks."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3)
    ).double()


def shard_model(model: nn.Module, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    mesh = init_device_mesh("cpu", (WORLD,))
    extra = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in (model[0], model[2]):
        fully_shard(block, mesh=mesh, **extra)
    fully_shard(model, mesh=mesh, **extra)
    return model


def build(name: str, model: nn.Module, sharded: bool, **kw: Any) -> Any:
    """Under FSDP2 the trackers keep hvp="auto"; one process uses the backend it picks."""
    if name in FD_NAMES and not sharded:
        kw = {"hvp": FD_FALLBACK, **kw}
    return OPTIMIZERS[name](model, **kw)


def attached_after_sharding(name: str) -> tuple[nn.Module, Any]:
    """What Accelerate (the Hugging Face Trainer with ``fsdp=``) does: the optimizer is built on
    the whole model, ``fully_shard`` replaces the parameters, the optimizer's ``param_groups``
    get the shards (matched by name), then the optimizer takes them up (``attach_fsdp``)."""
    model = make_model()
    opt = build(name, model, sharded=True)
    names = {id(p): n for n, p in model.named_parameters()}
    before = [[names[id(p)] for p in group["params"]] for group in opt.param_groups]
    shard_model(model)
    shards = dict(model.named_parameters())
    for group, group_names in zip(opt.param_groups, before, strict=True):
        group["params"][:] = [shards[n] for n in group_names]
    opt.attach_fsdp()
    return model, opt


def global_batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(16, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (16,), generator=g),
        )
        for _ in range(steps)
    ]


def shard(batch: tuple[torch.Tensor, ...], rank: int) -> tuple[torch.Tensor, ...]:
    return tuple(t.chunk(WORLD)[rank] for t in batch)


def train(
    opt: Any, model: nn.Module, batches: list[tuple[torch.Tensor, ...]], clip: float = 0.0
) -> list[float]:
    losses = []
    for x, y in batches:

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            return loss

        losses.append(float(opt.step(closure).detach()))
    return losses


def full(tensor: torch.Tensor) -> torch.Tensor:
    gather = getattr(tensor, "full_tensor", None)
    return (gather() if gather is not None else tensor).detach().clone()


def full_params(model: nn.Module) -> list[torch.Tensor]:
    return [full(p) for p in model.parameters()]


def full_grads(model: nn.Module) -> list[torch.Tensor]:
    return [full(p.grad) for p in model.parameters()]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12, msg=what)


# --------------------------------------------------------------------------------------------
# workers (run on every rank)


def global_worker(rank: int, world: int, folder: Path) -> None:
    results: dict[str, Any] = {}
    for name in OPTIMIZERS:
        model = shard_model(make_model())
        opt = build(name, model, sharded=True)
        train(opt, model, [shard(b, rank) for b in global_batches()])
        result: dict[str, Any] = {"params": full_params(model), "grads": full_grads(model)}
        if name in TRACKED_NAMES:
            layout = ParamLayout(list(model.parameters()))
            assert opt.tracker.backend == FD_FALLBACK  # hvp="auto" chose finite differences
            result["vector"] = layout.full(opt.tracker.vector)
            # v̂ is stored sharded: this rank's rows only.
            result["vector numel"] = opt.tracker.vector.numel()
            result["local numel"] = layout.numel
            result["bound"] = sum(
                math.ceil(p.shape[0] / world) * p[0].numel() for p in model.parameters()
            )
        results[name] = result
    for name in ATTACHED:
        model, opt = attached_after_sharding(name)
        train(opt, model, [shard(b, rank) for b in global_batches()])
        results[f"{name}/attached"] = {"params": full_params(model), "sharded": opt.layout.sharded}
    # Clipping inside the closure (global norm over the shards) and a step skipped for a NaN
    # that only rank 1's batch holds.
    model = shard_model(make_model())
    opt = build("sam", model, sharded=True, on_nonfinite="skip")
    batches = [shard(b, rank) for b in global_batches()]
    train(opt, model, batches, clip=0.05)
    x, y = batches[0]
    if rank == 1:
        x = x.clone()
        x[0, 0] = float("nan")
    before = full_params(model)
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient in the first pass"):
        train(opt, model, [(x, y)])
    assert all(torch.equal(a, b) for a, b in zip(before, full_params(model), strict=True))
    results["clipped"] = {"params": before}
    torch.save(results, folder / f"global-rank{rank}.pt")


def refusal_worker(rank: int, world: int, folder: Path) -> None:
    """Each refusal raises on every rank, before any pass, leaving the model unchanged."""
    model = shard_model(make_model())
    before = full_params(model)
    with pytest.raises(ValueError, match=r"sharpness='local'.*not supported under FSDP2"):
        SAM(model, SGD, lr=0.1, sharpness="local")
    for cls in (EigenSAM, XSAM):
        with pytest.raises(ValueError, match=r"hvp='autograd'.*FSDP2.*'fd-central'.*'fd-forward'"):
            cls(model, SGD, lr=0.1, hvp="autograd")
    with pytest.raises(ValueError, match="attach_fsdp: the optimizer's parameters are not FSDP2"):
        SAM(make_model(), SGD, lr=0.1).attach_fsdp()
    # The Hessian tools refuse the same, used directly.
    params = list(model.parameters())
    x, y = shard(global_batches(1)[0], rank)

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"hvp='autograd'.*FSDP2.*'fd-central'"):
        HessianOperator(closure, params, backend="autograd")
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="scaler: a GradScaler is not supported under FSDP2"):
        SAM(model, SGD, lr=0.1).step(closure, scaler=scaler)
    # Ranks with different settings: the existing mismatch check, on every rank.
    opt = SAM(model, SGD, rho=0.05 * (rank + 1), lr=0.1)
    with pytest.raises(ValueError, match="ranks disagree on the optimizer configuration.*rho"):
        train(opt, model, [shard(global_batches(1)[0], rank)])
    assert all(torch.equal(a, b) for a, b in zip(before, full_params(model), strict=True))
    Path(folder, f"refusals-rank{rank}.ok").touch()


def main_worker(rank: int, world: int, folder: Path) -> None:
    """The refusals, then the trainings (one pair of processes for both: spawning costs)."""
    refusal_worker(rank, world, folder)
    global_worker(rank, world, folder)


def bf16_worker(rank: int, world: int, folder: Path) -> None:
    """bf16 compute (MixedPrecisionPolicy), float32 parameters and gradient reduction."""
    results = {}
    for name in ("sam", "eigen-sam"):
        model = shard_model(
            make_model().float(),
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        )
        opt = build(name, model, sharded=True)
        batches = [
            tuple(t.float() if t.is_floating_point() else t for t in b) for b in global_batches()
        ]
        losses = train(opt, model, [shard(b, rank) for b in batches])
        assert all(math.isfinite(loss) for loss in losses)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        results[name] = full_params(model)
    torch.save(results, folder / f"bf16-rank{rank}.pt")


# --------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder where :func:`main_worker` left each rank's results."""
    folder = tmp_path_factory.mktemp("fsdp")
    run_ranks(main_worker, folder, timeout=300)
    return folder


def test_fsdp2_equals_one_process_on_the_concatenated_batch(two_ranks: Path) -> None:
    ranks = [torch.load(two_ranks / f"global-rank{r}.pt") for r in range(WORLD)]
    for name in OPTIMIZERS:
        model = make_model()
        opt = build(name, model, sharded=False)
        train(opt, model, global_batches())
        for r in ranks:  # every rank gathers the same weights, those of one process
            assert_close(r[name]["params"], full_params(model), name)
            # X-SAM: the corrected descent gradient (left in .grad) is the one process's.
            assert_close(r[name]["grads"], full_grads(model), name)
            if name in ATTACHED:
                assert r[f"{name}/attached"]["sharded"]
                assert_close(r[f"{name}/attached"]["params"], full_params(model), name)
        if name in TRACKED_NAMES:
            assert all(torch.equal(ranks[0][name]["vector"], r[name]["vector"]) for r in ranks)
            torch.testing.assert_close(ranks[0][name]["vector"], opt.tracker.vector)
            sizes = [r[name]["vector numel"] for r in ranks]
            assert sizes == [r[name]["local numel"] for r in ranks]
            assert sum(sizes) == opt.tracker.vector.numel()  # the shards cover v̂ once
            assert all(s <= r[name]["bound"] for s, r in zip(sizes, ranks, strict=True))
            assert max(sizes) < 0.6 * opt.tracker.vector.numel()
    # The variants differ from SAM on this data (the comparisons above can tell them apart).
    sam = ranks[0]["sam"]["params"][0]
    for name in ("asam", "reverse-sam", "x-sam"):
        assert not torch.allclose(sam, ranks[0][name]["params"][0], rtol=1e-6), name
    model = make_model()
    train(build("sam", model, sharded=False), model, global_batches(), clip=0.05)
    for r in ranks:
        assert_close(r["clipped"]["params"], full_params(model), "clipped")


def test_fsdp2_refusals_raise_on_every_rank(two_ranks: Path) -> None:
    assert all((two_ranks / f"refusals-rank{r}.ok").exists() for r in range(WORLD))


@pytest.mark.slow  # 2 more processes: about 20 s on a busy 2-core CPU
def test_fsdp2_bf16_mixed_precision_follows_float32(tmp_path: Path) -> None:
    run_ranks(bf16_worker, tmp_path, timeout=180)
    ranks = [torch.load(tmp_path / f"bf16-rank{r}.pt") for r in range(WORLD)]
    for name in ("sam", "eigen-sam"):
        model = make_model().float()
        opt = build(name, model, sharded=False)
        train(
            opt,
            model,
            [tuple(t.float() if t.is_floating_point() else t for t in b) for b in global_batches()],
        )
        start = full_params(make_model().float())
        for r in ranks:
            for a, b, w in zip(r[name], full_params(model), start, strict=True):
                # bf16 forward/backward: the update agrees with float32's to a few percent.
                torch.testing.assert_close(a - w, b - w, rtol=0.05, atol=2e-3)
