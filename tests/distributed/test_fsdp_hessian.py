"""Hessian analysis on FSDP2 (``fully_shard``) models: 2 gloo processes on the CPU, float64.

Ground truth: one process with the whole model on the concatenated batch and the same
finite-difference backend (FSDP2's gradients are the global batch's, the step ``h`` uses global
norms, the random draws are the one process's cut to each rank's rows), so the sharded results
equal it to rounding amplified by ``1/h``; and the exact (double-backward) product, from which
the finite differences differ by their ``O(h²)`` truncation error.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from harness import run_ranks
from test_fsdp_optim import WORLD, full_params, global_batches, make_model, shard, shard_model
from torch import nn

from eigensam.hessian.analysis import density, top_eigenvalues, trace
from eigensam.hessian.hvp import FD_FALLBACK, HessianOperator
from eigensam.hessian.tracker import EigenTracker
from eigensam.lab.engine.sharpness_probe import SharpnessProbe
from eigensam.optim import EigenSAM
from eigensam.parallel import ParamLayout

LANCZOS_ITERS = 20  # enough for the top 2 of this 151-parameter model
TRACE_PRODUCTS = 15


def closure_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def measurements(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, backend: str, every: bool = True
) -> dict:
    """The estimators on the model's loss at (x, y) (``every``: all of them, else Lanczos and
    Hutch++); vectors gathered whole (collective)."""
    params = list(model.parameters())
    layout = ParamLayout(params)
    closure = closure_of(model, x, y)
    out: dict[str, Any] = {}
    with HessianOperator(closure, params, backend=backend, model=model) as op:
        pairs = top_eigenvalues(op, k=2, num_iters=LANCZOS_ITERS, tol=None, seed=3)
        out["lanczos"] = [p.eigenvalue for p in pairs]
        out["lanczos vectors"] = [layout.full(p.eigenvector) for p in pairs]
        out["basis rows"] = pairs[0].eigenvector.numel()  # this rank's share of each vector
        out["hutchpp"] = trace(op, TRACE_PRODUCTS, seed=4).estimate
        if not every:
            return out
        slq = density(op, num_iters=8, num_probes=2, seed=5)
        out["slq nodes"] = torch.cat(slq.nodes)
        out["slq weights"] = torch.cat(slq.weights)
    tracker = EigenTracker(1, 8, method="lanczos", backend=backend, mode="train", seed=6)
    tracker.update(closure, params, model)
    out["tracker"] = (tracker.eigenvalue, layout.full(tracker.vector))
    # The engine's probe ("auto" picks finite differences under FSDP2) with Eigen-SAM's ε.
    probe = SharpnessProbe(LANCZOS_ITERS, 1e-12, seed=7, hvp="auto" if layout.sharded else backend)
    optimizer = EigenSAM(model, torch.optim.SGD, rho=0.1, eig_iters=4, hvp=backend, lr=0.1)
    record = probe.measure(closure, model, optimizer)
    out["probe"] = (record["lambda1"], layout.full(probe.vector))
    out["align"] = (record["align"], record["abs_cos"], record["opt_vector_cos"])
    return out


def worker(rank: int, world: int, folder: Path) -> None:
    whole = make_model()
    x, y = global_batches(1)[0]
    results = {
        "one process": measurements(whole, x, y, FD_FALLBACK),
        "exact": measurements(copy.deepcopy(whole), x, y, "autograd", every=False),
    }
    model = shard_model(make_model())
    before = full_params(model)
    results["sharded"] = measurements(model, *shard((x, y), rank), FD_FALLBACK)
    results["unchanged"] = all(
        torch.equal(a, b) for a, b in zip(before, full_params(model), strict=True)
    )
    results["global numel"] = ParamLayout(list(model.parameters())).global_numel
    torch.save(results, folder / f"rank{rank}.pt")


def same_direction(a: torch.Tensor, b: torch.Tensor) -> float:
    """``min_s ‖a − s b‖`` over the signs s = ±1."""
    return min(float((a - b).norm()), float((a + b).norm()))


def test_sharded_hessian_analysis_equals_one_process(tmp_path: Path) -> None:
    run_ranks(worker, tmp_path, timeout=240)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    one, exact = ranks[0]["one process"], ranks[0]["exact"]
    for result in ranks:
        assert result["unchanged"]  # parameters restored bit for bit after every product
        sharded = result["sharded"]
        # Each rank holds about 1/N of every Lanczos vector (rows 7, 9, 3 split unevenly).
        assert sharded["basis rows"] < 0.6 * result["global numel"]
        # Same finite-difference products: equal to rounding amplified by 1/h.
        for key in ("lanczos", "hutchpp"):
            torch.testing.assert_close(
                torch.tensor(sharded[key]), torch.tensor(one[key]), rtol=1e-9, atol=0, msg=key
            )
        for key in ("slq nodes", "slq weights"):
            torch.testing.assert_close(sharded[key], one[key], rtol=1e-7, atol=1e-9, msg=key)
        for a, b in zip(sharded["lanczos vectors"], one["lanczos vectors"], strict=True):
            assert same_direction(a, b) < 1e-7
        for key in ("tracker", "probe"):
            assert abs(sharded[key][0] - one[key][0]) <= 1e-9 * abs(one[key][0]), key
            assert same_direction(sharded[key][1], one[key][1]) < 1e-7, key
        torch.testing.assert_close(
            torch.tensor(sharded["align"]), torch.tensor(one["align"]), rtol=1e-7, atol=1e-9
        )
        # Against the exact products: the central difference's O(h²) truncation error.
        for key in ("lanczos", "hutchpp"):
            torch.testing.assert_close(
                torch.tensor(sharded[key]), torch.tensor(exact[key]), rtol=1e-6, atol=0, msg=key
            )
