"""High-level analysis (top eigenvalues, trace, density, and the reports of
:mod:`eigensam.lab.curvature_reports`) against the full Hessian of a small network from
torch.autograd.functional.hessian."""

import json
import math

import pytest
import torch
from hessian_truth import weighted_hessian
from torch import nn

from eigensam.hessian import (
    DatasetHessian,
    density,
    lanczos,
    power_iteration,
    top_eigenvalues,
    trace,
)
from eigensam.hessian.analysis import estimates_by_step
from eigensam.lab.curvature_reports import power_convergence_report, spectrum_report

F64 = torch.float64
SIZES = (5, 8, 11)


def network():
    """6 → 12 → 4 GeLU MLP: 136 parameters, an indefinite Hessian."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 4)).to(F64)


def make_batches(sizes=SIZES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 6, generator=g, dtype=F64), torch.randint(0, 4, (n,), generator=g))
        for n in sizes
    ]


@pytest.fixture(scope="module")
def problem():
    model = network()
    batches = make_batches()
    h = weighted_hessian(model, batches)
    return model, batches, h, torch.linalg.eigvalsh(h)


# ------------------------------------------------------------------------------ eigenvalues


def test_top_k_by_lanczos_to_tight_relative_tolerance(problem):
    model, batches, h, lam = problem
    with DatasetHessian(model, batches) as op:
        results = top_eigenvalues(op, 3, num_iters=op.dim, tol=1e-10)
    expected = lam.flip(0)[:3]
    for result, value in zip(results, expected.tolist(), strict=True):
        assert result.converged and result.eigenvalue == pytest.approx(value, rel=1e-10)
        true_residual = float(
            (h @ result.eigenvector - result.eigenvalue * result.eigenvector).norm()
        )
        assert true_residual <= 1e-9 * abs(value)
        assert result.residual == pytest.approx(true_residual, abs=1e-9 * abs(value))
    assert results[0].num_matvecs < op.dim  # stopped on the residual


def test_smallest_and_power_iteration(problem):
    model, batches, h, lam = problem
    with DatasetHessian(model, batches) as op:
        smallest = top_eigenvalues(op, 2, which="SA", num_iters=op.dim, tol=1e-10)
        power = top_eigenvalues(op, 1, method="power", num_iters=3000, tol=1e-9, seed=1)
    assert [r.eigenvalue for r in smallest] == pytest.approx(lam[:2].tolist(), rel=1e-10)
    largest_magnitude = float(lam[lam.abs().argmax()])
    assert power[0].converged
    assert power[0].eigenvalue == pytest.approx(largest_magnitude, rel=1e-8)


def test_lanczos_finds_the_largest_when_a_negative_one_dominates():
    """On a matrix: power iteration finds −10, Lanczos "LA" finds 3 at the same budget."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=F64))
    lam = torch.cat([torch.tensor([-10.0, 3.0], dtype=F64), torch.linspace(-1, 1, 38, dtype=F64)])
    h = q @ torch.diag(lam) @ q.T
    assert top_eigenvalues(h, num_iters=40, tol=1e-10)[0].eigenvalue == pytest.approx(3.0)
    power = top_eigenvalues(h, method="power", num_iters=500, tol=1e-10)[0]
    assert power.eigenvalue == pytest.approx(-10.0)
    start = torch.ones(40, dtype=F64)
    assert top_eigenvalues(h, num_iters=40, v0=start)[0].eigenvalue == pytest.approx(3.0)


# ------------------------------------------------------------------------------ trace, density


@pytest.mark.parametrize("method, num_matvecs", [("hutchinson", 60), ("hutchpp", 60)])
def test_trace_within_its_standard_error(problem, method, num_matvecs):
    model, batches, h, lam = problem
    exact = float(lam.sum())
    with DatasetHessian(model, batches) as op:
        estimates = [trace(op, num_matvecs, method=method, seed=s) for s in range(3)]
    for estimate in estimates:
        assert estimate.num_matvecs == num_matvecs
        assert 0 < estimate.std_error < abs(exact)
        assert abs(estimate.estimate - exact) <= 3 * estimate.std_error


def test_hutchpp_is_exact_once_its_sketch_spans_the_space(problem):
    model, batches, h, lam = problem
    with DatasetHessian(model, batches) as op:
        estimate = trace(op, 3 * op.dim, seed=0)
    assert estimate.estimate == pytest.approx(float(lam.sum()), rel=1e-9)


def test_density_mass_matches_the_eigenvalue_histogram(problem):
    model, batches, h, lam = problem
    with DatasetHessian(model, batches) as op:
        result = density(op, num_iters=30, num_probes=10, seed=0)
    assert result.num_probes == 10 and result.num_matvecs == 300
    grid = torch.linspace(-1.0, 1.5, 5001, dtype=F64)
    values = result.density(grid, sigma=0.01)
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-6)
    edges = [-1.0, -0.2, -0.05, 0.05, 0.2, 0.5, 1.5]
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (grid >= low) & (grid <= high)
        mass = float(torch.trapezoid(values[inside], grid[inside]))
        fraction = float(((lam >= low) & (lam < high)).double().mean())
        assert mass == pytest.approx(fraction, abs=0.04), (low, high)
    assert result.moment(1) == pytest.approx(float(lam.mean()), abs=0.02)


# ------------------------------------------------------------------------------ reports


def test_spectrum_report_writes_valid_json_and_png(problem, tmp_path):
    model, batches, h, lam = problem
    model.eval()
    rng = torch.get_rng_state()
    report = spectrum_report(
        model,
        batches,
        tmp_path / "out",
        top_k=2,
        lanczos_iters=40,
        trace_matvecs=60,
        eig_tol=1e-8,
        label="mlp",
    )
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    model.train()
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["spectrum.json", "spectrum.png"]  # no temporary files left
    assert (tmp_path / "out" / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((tmp_path / "out" / "spectrum.json").read_text())
    assert written["lambda_max"] == report["lambda_max"]
    assert [e["eigenvalue"] for e in written["eigenvalues"]] == pytest.approx(
        lam.flip(0)[:2].tolist(), rel=1e-7
    )
    assert all(e["relative_residual"] <= 1e-8 for e in written["eigenvalues"])
    estimate = written["trace"]
    assert abs(estimate["estimate"] - float(lam.sum())) <= 3 * estimate["std_error"]
    assert sum(written["density"]["weights"][0]) == pytest.approx(1.0)
    assert len(written["density_curve"]["grid"]) == len(written["density_curve"]["values"])
    counts = written["num_matvecs"]
    assert counts["trace"] == 60 and counts["density"] == 40 and counts["determinism_check"] == 1
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert written["settings"]["batch_sizes"] == list(SIZES)
    assert written["settings"]["mode"] == "train" and written["settings"]["dim"] == 136
    assert set(written["seconds"]) == {"eigenvalues", "trace", "density", "total"}


@pytest.mark.parametrize("warm", ["batches", "vector", None])
def test_power_convergence_report(problem, tmp_path, warm):
    model, batches, h, lam = problem
    other = make_batches((16,), seed=7)
    warm_start = {"batches": other, "vector": torch.ones(136, dtype=F64), None: None}[warm]
    report = power_convergence_report(
        model, batches, tmp_path, max_steps=12, warm_start=warm_start, mode="eval"
    )
    written = json.loads((tmp_path / "power_convergence.json").read_text())
    assert (tmp_path / "power_convergence.png").read_bytes()[:4] == b"\x89PNG"
    assert written["reference"]["eigenvalue"] == pytest.approx(float(lam[-1]), rel=1e-9)
    assert written["reference"]["relative_residual"] <= 1e-6
    assert written["steps"] == list(range(13))
    starts = ["cold"] if warm is None else ["cold", "warm"]
    assert written["warm_start"]["kind"] == warm
    for method in ("power", "lanczos"):
        assert sorted(written["curves"][method]) == sorted(starts)
        for start in starts:
            curve = written["curves"][method][start]
            assert len(curve["abs_cos"]) == len(curve["align"]) == 13
            assert curve["eigenvalue"][0] is None
            for c, a in zip(curve["abs_cos"], curve["align"], strict=True):
                assert a == pytest.approx(1 - math.sqrt(2 - 2 * c), abs=1e-9)
    lanczos_cold = written["curves"]["lanczos"]["cold"]
    assert lanczos_cold["abs_cos"][-1] > 0.999
    assert lanczos_cold["abs_cos"][-1] > written["curves"]["power"]["cold"]["abs_cos"][-1]
    curve_products = 2 * len(starts) * 12
    assert written["num_matvecs"]["curves"] == curve_products
    assert report["num_matvecs"] == written["num_matvecs"]


def test_estimates_by_step_replays_each_budget_exactly():
    """Budget t from one recorded run equals a separate run with budget t."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(30, 30, generator=g, dtype=F64)
    h = a + a.T
    v0 = torch.randn(30, generator=g, dtype=F64)
    products = []

    def matvec(v):
        products.append(1)
        return h @ v

    for solve in (
        lambda mv, t: lanczos(mv, v0, t)[0],
        lambda mv, t: power_iteration(mv, v0, t),
    ):
        products.clear()
        results = estimates_by_step(solve, matvec, 10)
        assert len(products) == 10
        for t, result in enumerate(results, start=1):
            direct = solve(lambda v: h @ v, t)
            assert result.num_matvecs == t
            assert result.eigenvalue == pytest.approx(direct.eigenvalue, rel=1e-12)
            torch.testing.assert_close(result.eigenvector, direct.eigenvector)


# ------------------------------------------------------------------------------ bad input


def test_bad_arguments(problem, tmp_path):
    model, batches, h, lam = problem
    with pytest.raises(TypeError, match="op must be"):
        top_eigenvalues(lambda v: v)
    with pytest.raises(ValueError, match="square"):
        trace(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="method"):
        top_eigenvalues(h, method="arnoldi")
    with pytest.raises(ValueError, match="which='SA' needs method='lanczos'"):
        top_eigenvalues(h, method="power", which="SA")
    with pytest.raises(ValueError, match="method"):
        trace(h, method="exact")
    with pytest.raises(TypeError, match="seed"):
        density(h, seed=1.5)
    with pytest.raises(ValueError, match="num_matvecs"):
        trace(h, 2)
    with pytest.raises(ValueError, match="top_k"):
        spectrum_report(model, batches, tmp_path, top_k=0)
    with pytest.raises(ValueError, match="trace_matvecs must be >= 3"):
        spectrum_report(model, batches, tmp_path, trace_matvecs=2)
    with pytest.raises(ValueError, match="eig_tol"):
        spectrum_report(model, batches, tmp_path, eig_tol=0)
    with pytest.raises(ValueError, match="reference_tol"):
        power_convergence_report(model, batches, tmp_path, reference_tol=-1.0)
    assert not any(tmp_path.iterdir())  # nothing computed or written before the check
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="out_dir"):
        spectrum_report(model, batches, tmp_path / "file")
    with pytest.raises(ValueError, match=r"warm_start.*\(136,\)"):
        power_convergence_report(model, batches, tmp_path, warm_start=torch.ones(3))
    with pytest.raises(TypeError, match=r"warm_start\[0\]"):
        power_convergence_report(model, batches, tmp_path, warm_start=[torch.ones(3)])
