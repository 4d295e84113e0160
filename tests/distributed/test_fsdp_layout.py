"""Flat vectors over FSDP2 shards (``ParamLayout``): 2 gloo processes on the CPU.

Ground truth: the same vectors in one process, in parameter order (``cat(p.reshape(-1))``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness import run_ranks
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from eigensam.hessian.eigen import power_iteration
from eigensam.parallel import ParamLayout, is_fsdp1, is_fsdp2, refuse_fsdp1


def make_model() -> nn.Module:
    """Row counts 7 and 3: uneven shards at 2 ranks (4 + 3 and 2 + 1 rows)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def shard_model(model: nn.Module, world: int) -> nn.Module:
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def layout_worker(rank: int, world: int, folder: Path) -> None:
    plain = list(make_model().parameters())
    model = shard_model(make_model(), world)
    assert is_fsdp2(model) and not is_fsdp2(make_model())
    layout = ParamLayout(list(model.parameters()))
    assert layout.sharded
    total = sum(p.numel() for p in plain)
    assert layout.global_numel == total
    # This rank's rows: 4,4,2,2 of 7,7,3,3 on rank 0; 3,3,1,1 on rank 1.
    assert layout.numel == [4 * 5 + 4 + 2 * 7 + 2, 3 * 5 + 3 + 1 * 7 + 1][rank]
    g = torch.Generator().manual_seed(3)
    a = torch.randn(total, generator=g, dtype=torch.float64)
    b = torch.randn(total, generator=g, dtype=torch.float64)
    a_r, b_r = layout.shard(a), layout.shard(b)
    assert a_r.shape == (layout.numel,)
    assert torch.equal(layout.full(a_r), a)  # shard then gather is the identity
    # The shards are the parameters' own: flattening the sharded parameters gives shard(w).
    w = torch.cat([p.detach().reshape(-1) for p in plain])
    assert torch.equal(layout.flatten(list(model.parameters())), layout.shard(w))
    torch.testing.assert_close(layout.dot(a_r, b_r), a @ b, rtol=1e-13, atol=0)
    torch.testing.assert_close(layout.norm(a_r), a.norm(), rtol=1e-13, atol=0)
    assert float(layout.amax(a_r)) == float(a.abs().max())
    pieces = [t.detach() * 2 for t in plain]
    torch.testing.assert_close(
        layout.norm_of(list(model.parameters())), torch.cat([p.reshape(-1) for p in plain]).norm()
    )
    assert torch.equal(layout.full(layout.from_pieces(pieces)), 2 * w)
    # pieces() are DTensors over the vector's storage, shaped like the parameters.
    views = layout.pieces(a_r)
    assert [tuple(v.shape) for v in views] == [tuple(p.shape) for p in plain]
    assert torch.equal(torch.cat([v.full_tensor().reshape(-1) for v in views]), a)
    assert layout.all_true(rank == 0) is False and layout.all_true(True) is True
    # In-place changes of the local shards write the sharded parameters.
    with torch.no_grad():
        torch._foreach_add_(layout.locals, layout.unflatten(layout.shard(a)))
    after = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(after, w + a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="vector has shape"):
        layout.unflatten(a)
    # Power iteration on sharded vectors (global dot and norm) is the one process's.
    m = torch.randn(total, total, generator=g, dtype=torch.float64)
    sym = m + m.T
    plain_result = power_iteration(lambda v: sym @ v, a, 6)
    sharded = power_iteration(lambda v: layout.shard(sym @ layout.full(v)), a_r, 6, algebra=layout)
    assert sharded.eigenvalue == pytest.approx(plain_result.eigenvalue, rel=1e-12)
    assert sharded.residual == pytest.approx(plain_result.residual, rel=1e-9)
    torch.testing.assert_close(layout.full(sharded.eigenvector), plain_result.eigenvector)
    # HSDP (a 2-D mesh: replicated, then sharded) is refused, naming the placement.
    mesh2d = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    hsdp = fully_shard(make_model(), mesh=mesh2d)
    with pytest.raises(ValueError, match=r"parameter 0 is a DTensor placed \(Replicate\(\), Sh"):
        ParamLayout(list(hsdp.parameters()))
    # Mixed plain and sharded parameters cannot be summed once: refused.
    with pytest.raises(ValueError, match=r"parameters \[4\] are plain tensors.*fully_shard"):
        ParamLayout([*model.parameters(), nn.Parameter(torch.ones(2))])


def test_sharded_flat_vectors_match_one_process(tmp_path: Path) -> None:
    run_ranks(layout_worker, tmp_path, timeout=120)


def test_replicated_layout_is_the_plain_algebra() -> None:
    params = list(make_model().parameters())
    layout = ParamLayout(params)
    assert not layout.sharded
    g = torch.Generator().manual_seed(3)
    a = torch.randn(layout.numel, generator=g, dtype=torch.float64)
    assert torch.equal(layout.flatten(params), torch.cat([p.reshape(-1) for p in params]))
    assert torch.equal(layout.dot(a, a), a @ a) and torch.equal(layout.norm(a), a.norm())
    assert layout.shard(a) is a and layout.full(a) is a
    assert [v.data_ptr() for v in layout.pieces(a)][0] == a.data_ptr()


def test_fsdp1_is_detected_and_refused() -> None:
    assert not is_fsdp1(make_model()) and not is_fsdp1(object())
    refuse_fsdp1(make_model())  # no FSDP1 inside: nothing raised
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Fake(FullyShardedDataParallel):  # no process group needed to test the detection
        def __init__(self) -> None:
            nn.Module.__init__(self)

    holder = nn.Sequential(Fake())
    assert is_fsdp1(holder)
    with pytest.raises(TypeError, match=r"FullyShardedDataParallel \(FSDP1\).*fully_shard"):
        refuse_fsdp1(holder)
