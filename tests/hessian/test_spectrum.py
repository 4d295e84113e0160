"""Stochastic Lanczos quadrature and stochastic trace estimators on matrices with known spectra."""

import json
import math

import pytest
import torch

from eigensam.hessian.spectrum import hutchinson_trace, hutchpp_trace, slq_density

F64 = torch.float64


def matrix(eigenvalues, seed=0, dtype=F64):
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=F64))
    return (q @ torch.diag(lam) @ q.T).to(dtype)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def two_clusters():
    """dim 200: 150 eigenvalues in [−0.25, 0.25], 50 in [5, 6]."""
    g = gen(0)
    lam = torch.cat([torch.rand(150, generator=g) * 0.5 - 0.25, 5 + torch.rand(50, generator=g)])
    return lam.to(F64), matrix(lam, seed=1)


# ------------------------------------------------------------------------------ SLQ


def test_slq_density_mass_matches_eigenvalue_histogram():
    lam, h = two_clusters()
    density = slq_density(
        lambda v: h @ v, 200, num_probes=10, num_iters=50, generator=gen(0), dtype=F64
    )
    assert density.num_matvecs == 500 and density.num_probes == 10
    grid = torch.linspace(-3.0, 9.0, 6001, dtype=F64)
    values = density.density(grid, sigma=0.1)
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-6)
    for low, high, tol in [
        (-3.0, 2.5, 0.03),
        (2.5, 9.0, 0.03),
        (-3.0, 0.0, 0.05),
        (4.0, 5.5, 0.05),
    ]:
        inside = (grid >= low) & (grid <= high)
        mass = float(torch.trapezoid(values[inside], grid[inside]))
        fraction = float(((lam >= low) & (lam < high)).double().mean())
        assert mass == pytest.approx(fraction, abs=tol), (low, high)
    # No mass in the gap between the clusters.
    gap = (grid >= 1.0) & (grid <= 4.0)
    assert float(torch.trapezoid(values[gap], grid[gap])) < 1e-3
    # First moment estimates tr(H)/dim (a Hutchinson estimate with 10 probes).
    assert density.moment(1) == pytest.approx(float(lam.mean()), abs=0.1)
    assert density.moment(0) == pytest.approx(1.0, abs=1e-12)


def test_slq_quadrature_is_exact_for_low_moments_of_the_probe():
    """Σ τ_j θ_j^p = vᵀ H^p v for p < 2m, with v the (normalized) probe."""
    lam, h = two_clusters()
    probes = []

    def matvec(v):
        probes.append(v.clone())
        return h @ v

    density = slq_density(matvec, 200, num_iters=10, generator=gen(3), dtype=F64)
    v = probes[0]
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-12)
    assert torch.all(v.abs() == v.abs()[0])  # a normalized Rademacher probe
    assert density.moment(1) == pytest.approx(float(v @ h @ v), rel=1e-12)
    assert density.moment(2) == pytest.approx(float((h @ v).norm() ** 2), rel=1e-12)
    assert density.moment(3) == pytest.approx(float(v @ h @ h @ h @ v), rel=1e-10)


def test_slq_with_full_krylov_space_recovers_every_eigenvalue():
    lam = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 7.0, 10.0], dtype=F64)
    h = matrix(lam)
    density = slq_density(lambda v: h @ v, 10, num_iters=50, generator=gen(0), dtype=F64)
    assert density.num_matvecs == 10
    torch.testing.assert_close(density.nodes[0], lam, rtol=0, atol=1e-10)
    assert float(density.weights[0].sum()) == pytest.approx(1.0, abs=1e-12)


def test_slq_float32_gaussian_probes_and_json():
    lam, h = two_clusters()
    h32 = h.float()
    density = slq_density(
        lambda v: h32 @ v, 200, num_probes=3, num_iters=30, generator=gen(1), probe="gaussian"
    )
    assert density.moment(0) == pytest.approx(1.0, abs=1e-6)
    assert min(float(n.min()) for n in density.nodes) > float(lam.min()) - 1e-3
    assert max(float(n.max()) for n in density.nodes) < float(lam.max()) + 1e-3
    payload = json.loads(json.dumps(density.to_dict()))
    assert payload["num_probes"] == 3 and payload["num_matvecs"] == 90
    assert len(payload["nodes"]) == 3 and len(payload["weights"][0]) == 30
    assert density.density([0.0, 5.5], sigma=0.2).shape == (2,)


def test_slq_is_reproducible_with_a_generator():
    _, h = two_clusters()
    a = slq_density(lambda v: h @ v, 200, 2, 20, generator=gen(5), dtype=F64)
    b = slq_density(lambda v: h @ v, 200, 2, 20, generator=gen(5), dtype=F64)
    assert a.to_dict() == b.to_dict()


# ------------------------------------------------------------------------------ trace


@pytest.mark.parametrize("seed", range(8))
def test_trace_estimates_within_reported_standard_errors(seed):
    lam, h = two_clusters()
    trace = float(lam.sum())
    hutch = hutchinson_trace(lambda v: h @ v, 200, 100, generator=gen(seed), dtype=F64)
    hpp = hutchpp_trace(lambda v: h @ v, 200, 150, generator=gen(seed), dtype=F64)
    assert hutch.num_matvecs == 100 and len(hutch.samples) == 100
    assert hpp.num_matvecs == 150 and len(hpp.samples) == 50
    for estimate in (hutch, hpp):
        assert estimate.std_error > 0
        assert abs(estimate.estimate - trace) <= 3 * estimate.std_error
        assert estimate.estimate == pytest.approx(sum(estimate.samples) / len(estimate.samples))


def test_hutchpp_is_exact_on_low_rank_matrix():
    lam = [9.0, 5.0, -3.0, 2.0, 0.7] + [0.0] * 95
    h = matrix(lam, seed=2)
    estimate = hutchpp_trace(lambda v: h @ v, 100, 18, generator=gen(0), dtype=F64)
    assert estimate.estimate == pytest.approx(sum(lam), rel=1e-8)
    assert estimate.std_error < 1e-10


def test_hutchpp_has_lower_variance_than_hutchinson_on_decaying_spectrum():
    lam = [0.7**i for i in range(100)]
    h = matrix(lam, seed=3)
    trace = sum(lam)
    budget = 30
    estimates_h, estimates_pp = [], []
    for seed in range(30):
        estimates_h.append(
            hutchinson_trace(lambda v: h @ v, 100, budget, gen(seed), dtype=F64).estimate
        )
        estimates_pp.append(
            hutchpp_trace(lambda v: h @ v, 100, budget, gen(seed), dtype=F64).estimate
        )
    mse_h = sum((e - trace) ** 2 for e in estimates_h) / len(estimates_h)
    mse_pp = sum((e - trace) ** 2 for e in estimates_pp) / len(estimates_pp)
    assert mse_pp < 0.1 * mse_h  # observed ratio ≈ 1/50


def test_trace_float32_and_json():
    lam, h = two_clusters()
    h32 = h.float()
    estimate = hutchinson_trace(lambda v: h32 @ v, 200, 50, generator=gen(0))
    assert abs(estimate.estimate - float(lam.sum())) <= 4 * estimate.std_error
    payload = json.loads(json.dumps(estimate.to_dict()))
    assert payload["num_matvecs"] == 50 and len(payload["samples"]) == 50
    single = hutchinson_trace(lambda v: h32 @ v, 200, 1, generator=gen(0))
    assert math.isnan(single.std_error) and single.to_dict()["std_error"] is None


# ------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda mv: slq_density(mv, 0), ValueError, "dim"),
        (lambda mv: slq_density(mv, 4, num_probes=0), ValueError, "num_probes"),
        (lambda mv: slq_density(mv, 4, num_iters=1.5), TypeError, "num_iters"),
        (lambda mv: slq_density(mv, 4, probe="sobol"), ValueError, "probe"),
        (lambda mv: slq_density(mv, 4, dtype=torch.int64), TypeError, "dtype"),
        (lambda mv: slq_density(mv, 4, dtype=F64).density([0.0], 0.0), ValueError, "sigma"),
        (lambda mv: slq_density(mv, 4, dtype=F64).moment(-1), ValueError, "order"),
        (lambda mv: hutchinson_trace(mv, 4, 0), ValueError, "num_samples"),
        (lambda mv: hutchinson_trace(mv, -4, 3), ValueError, "dim"),
        (lambda mv: hutchpp_trace(mv, 4, 2), ValueError, "num_matvecs"),
        (lambda mv: hutchpp_trace(mv, 4, True), TypeError, "num_matvecs"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, error, name):
    h = matrix([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(error, match=name):
        call(lambda v: h.to(v.dtype) @ v)
