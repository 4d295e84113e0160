"""Power iteration, Lanczos and deflated power iteration on matrices with known spectra."""

import pytest
import torch

from eigensam.hessian.eigen import (
    deflated_power_iteration,
    lanczos,
    lanczos_tridiagonal,
    power_iteration,
)

F64 = torch.float64


def matrix(eigenvalues, seed=0, dtype=F64):
    """H = Q diag(λ) Qᵀ with a random orthogonal Q; returns H and Q (columns = eigenvectors)."""
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=F64))
    return (q @ torch.diag(lam) @ q.T).to(dtype), q.to(dtype)


def start(n, seed=1, dtype=F64):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def true_residual(h, result):
    v = result.eigenvector
    return float((h @ v - result.eigenvalue * v).norm())


# A negative eigenvalue (−8) larger in magnitude than the top one (3).
NEGATIVE_DOMINANT = [3.0, 2.0, 1.0, 0.5, 0.1, -0.3, -1.0, -8.0] + [0.2] * 12


# ------------------------------------------------------------------------------ power iteration


def test_power_iteration_recovers_top_pair_of_positive_dominant_matrix():
    lam = [10.0, 5.0, 3.0, 1.0, 0.5, -0.5] + [0.1] * 24
    h, q = matrix(lam)
    result = power_iteration(lambda v: h @ v, start(30), 200)
    assert result.eigenvalue == pytest.approx(10.0, rel=1e-12)
    assert abs(float(result.eigenvector @ q[:, 0])) == pytest.approx(1.0, abs=1e-12)
    assert float(result.eigenvector.norm()) == pytest.approx(1.0, abs=1e-12)
    assert result.num_matvecs == 200


def test_power_iteration_tol_stops_early_and_reports_residual():
    lam = [10.0, 5.0, 3.0, 1.0] + [0.1] * 26
    h, _ = matrix(lam)
    result = power_iteration(lambda v: h @ v, start(30), 500, tol=1e-6)
    assert result.converged
    assert result.num_matvecs < 100
    assert result.residual <= 1e-6 * abs(result.eigenvalue)
    assert result.eigenvalue == pytest.approx(10.0, rel=1e-9)
    # The returned vector is one step further along than the one the residual describes.
    assert true_residual(h, result) <= result.residual


def test_power_iteration_finds_negative_dominant_eigenvalue_with_its_sign():
    h, q = matrix(NEGATIVE_DOMINANT)
    result = power_iteration(lambda v: h @ v, start(20), 300)
    assert result.eigenvalue == pytest.approx(-8.0, rel=1e-10)
    assert abs(float(result.eigenvector @ q[:, 7])) == pytest.approx(1.0, abs=1e-10)


# ------------------------------------------------------------------------------ Lanczos


def test_lanczos_which_selects_algebraic_or_magnitude_extremes():
    h, q = matrix(NEGATIVE_DOMINANT)
    mv = lambda v: h @ v  # noqa: E731
    la = lanczos(mv, start(20), 20, k=1, which="LA")[0]
    lm = lanczos(mv, start(20), 20, k=1, which="LM")[0]
    sa = lanczos(mv, start(20), 20, k=2, which="SA")
    assert la.eigenvalue == pytest.approx(3.0, rel=1e-10)
    assert abs(float(la.eigenvector @ q[:, 0])) == pytest.approx(1.0, abs=1e-10)
    assert lm.eigenvalue == pytest.approx(-8.0, rel=1e-10)
    assert [r.eigenvalue for r in sa] == pytest.approx([-8.0, -1.0], rel=1e-10)


def test_lanczos_top_k_match_eigvalsh_to_1e_8():
    g = torch.Generator().manual_seed(3)
    lam = torch.cat([torch.tensor([50.0, 30.0, 20.0, 12.0, 8.0]), torch.rand(195, generator=g)])
    lam = torch.cat([lam, -torch.rand(50, generator=g) * 3])
    h, _ = matrix(lam.tolist(), seed=4)
    truth = torch.linalg.eigvalsh(h).flip(0)[:5]
    results = lanczos(lambda v: h @ v, start(len(lam)), 60, k=5, which="LA")
    values = torch.tensor([r.eigenvalue for r in results], dtype=F64)
    torch.testing.assert_close(values, truth, rtol=1e-8, atol=0)
    assert all(r.num_matvecs == 60 for r in results)
    for r in results:
        assert float(r.eigenvector.norm()) == pytest.approx(1.0, abs=1e-12)
        # The cheap residual |β_m s_m| agrees with the true ‖Hy − θy‖.
        assert r.residual == pytest.approx(true_residual(h, r), rel=1e-3, abs=1e-12)


def test_lanczos_resolves_near_degenerate_top_pair():
    lam = [10.0, 9.999, 5.0, 4.0] + torch.linspace(-2.0, 2.0, 96).tolist()
    h, q = matrix(lam, seed=5)
    results = lanczos(lambda v: h @ v, start(100), 100, k=2)
    assert [r.eigenvalue for r in results] == pytest.approx([10.0, 9.999], rel=1e-6)
    # The two Ritz vectors span the top-2 eigenspace: their projection onto it has norm 1.
    y = torch.stack([r.eigenvector for r in results], dim=1)
    overlap = q[:, :2].T @ y
    torch.testing.assert_close(overlap.T @ overlap, torch.eye(2, dtype=F64), atol=1e-8, rtol=0)
    assert float(y[:, 0] @ y[:, 1]) == pytest.approx(0.0, abs=1e-10)


def test_lanczos_tol_stops_early_when_all_k_converged():
    lam = [20.0, 15.0, 10.0] + torch.linspace(-1.0, 1.0, 197).tolist()
    h, _ = matrix(lam, seed=6)
    results = lanczos(lambda v: h @ v, start(200), 200, k=2, tol=1e-10)
    assert results[0].num_matvecs < 60
    for r in results:
        assert r.converged
        assert r.residual <= 1e-10 * abs(r.eigenvalue)
        assert true_residual(h, r) <= 1e-9 * abs(r.eigenvalue)
    assert [r.eigenvalue for r in results] == pytest.approx([20.0, 15.0], rel=1e-12)


def test_lanczos_without_tol_uses_all_iterations_and_reports_not_converged():
    h, _ = matrix(torch.linspace(0.0, 1.0, 50).tolist())
    result = lanczos(lambda v: h @ v, start(50), 5)[0]
    assert result.num_matvecs == 5
    assert not result.converged
    assert result.residual == pytest.approx(true_residual(h, result), rel=1e-6)


def test_lanczos_num_iters_capped_at_dimension_gives_exact_spectrum():
    lam = [4.0, 3.0, 2.0, 1.0, -1.0, -5.0]
    h, _ = matrix(lam)
    results = lanczos(lambda v: h @ v, start(6), 100, k=6, which="LA")
    assert [r.eigenvalue for r in results] == pytest.approx(lam, rel=1e-12)
    assert all(r.num_matvecs == 6 and r.residual < 1e-12 for r in results)


def test_lanczos_breakdown_stops_with_exact_pairs():
    """A start vector in a 2-dimensional invariant subspace: the Krylov space stops growing."""
    h = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=F64))
    v0 = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=F64)
    results = lanczos(lambda v: h @ v, v0, 5, k=2)
    assert [r.eigenvalue for r in results] == pytest.approx([5.0, 3.0], rel=1e-14)
    assert all(r.converged and r.num_matvecs == 2 and r.residual < 1e-14 for r in results)
    assert lanczos_tridiagonal(lambda v: h @ v, v0, 5).num_matvecs == 2


def test_lanczos_breakdown_before_k_vectors_restarts():
    h = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=F64))
    v0 = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)  # an eigenvector: breakdown at step 1
    g = torch.Generator().manual_seed(0)
    results = lanczos(lambda v: h @ v, v0, 5, k=3, generator=g)
    assert [r.eigenvalue for r in results] == pytest.approx([5.0, 4.0, 3.0], rel=1e-12)


def test_lanczos_float32_operator_returns_float32_unit_vectors():
    h, q = matrix([7.0, 3.0] + [0.5] * 38, dtype=torch.float32)
    result = lanczos(lambda v: h @ v, start(40, dtype=torch.float32), 20)[0]
    assert result.eigenvector.dtype == torch.float32
    assert float(result.eigenvector.norm()) == pytest.approx(1.0, abs=1e-6)
    assert result.eigenvalue == pytest.approx(7.0, rel=1e-5)
    assert abs(float(result.eigenvector @ q[:, 0])) == pytest.approx(1.0, abs=1e-5)


# A near-degenerate top spectrum, as on small MLPs: 0.160, 0.155, 0.149, 0.141, 0.133, then a bulk.
NEAR_DEGENERATE = [0.160, 0.155, 0.149, 0.141, 0.133] + torch.linspace(0.1, -0.02, 495).tolist()


def test_lanczos_reaches_float64_precision_on_a_near_degenerate_spectrum():
    h, _ = matrix(NEAR_DEGENERATE)
    results = lanczos(lambda v: h @ v, start(500), 40, k=5)
    truth = torch.linalg.eigvalsh(h).flip(0)[:5]
    errors = [abs(r.eigenvalue - float(t)) / float(t) for r, t in zip(results, truth, strict=True)]
    assert max(errors) < 1e-13


def test_lanczos_tolerance_rule_bounds_the_eigenvalue_error():
    """Stopping at residual r ≤ tol·|θ| leaves |θ − λ| ≤ r²/δ (Kato–Temple), far below tol·|θ|."""
    h, _ = matrix(NEAR_DEGENERATE)
    truth = torch.linalg.eigvalsh(h).flip(0)
    results = lanczos(lambda v: h @ v, start(500), 100, k=2, tol=1e-3)
    assert results[0].num_matvecs < 100
    for i, result in enumerate(results):
        gap = min(abs(result.eigenvalue - float(t)) for j, t in enumerate(truth) if j != i)
        error = abs(result.eigenvalue - float(truth[i]))
        assert error <= result.residual**2 / gap
        assert result.residual <= 1e-3 * abs(result.eigenvalue)


def test_lanczos_refuses_products_more_precise_than_its_vectors():
    h, _ = matrix([3.0, 1.0, 0.0, -1.0])
    with pytest.raises(TypeError, match="float64 products for torch.float32"):
        lanczos(lambda v: h @ v.double(), 4, 3, generator=torch.Generator().manual_seed(7))


def test_lanczos_accepts_a_dimension_and_a_generator():
    h, _ = matrix([3.0, 1.0, 0.0, -1.0])
    runs = [
        lanczos(lambda v: h @ v, 4, 3, generator=torch.Generator().manual_seed(7), dtype=F64)[0]
        for _ in range(2)
    ]
    assert runs[0].eigenvector.dtype == F64
    torch.testing.assert_close(runs[0].eigenvector, runs[1].eigenvector, rtol=0, atol=0)


def test_lanczos_tridiagonal_is_qt_h_q():
    """T_m has the Ritz values of the Krylov space; with m = dim they are the eigenvalues."""
    lam = [6.0, 2.0, 1.0, 0.0, -3.0]
    h, _ = matrix(lam)
    alphas, betas, used = lanczos_tridiagonal(lambda v: h @ v, start(5), 10)
    assert used == 5 and alphas.shape == (5,) and betas.shape == (4,)
    t = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    torch.testing.assert_close(
        torch.linalg.eigvalsh(t), torch.tensor(sorted(lam), dtype=F64), rtol=0, atol=1e-12
    )


# ------------------------------------------------------------------------------ deflation


def test_deflated_power_iteration_finds_top_3_by_magnitude():
    lam = [10.0, -6.0, 3.0, 1.0, 0.5] + [0.1] * 25
    h, q = matrix(lam, seed=2)
    g = torch.Generator().manual_seed(0)
    results = deflated_power_iteration(lambda v: h @ v, start(30), 3, 300, tol=1e-10, generator=g)
    assert [r.eigenvalue for r in results] == pytest.approx([10.0, -6.0, 3.0], rel=1e-9)
    for i, r in enumerate(results):
        assert r.converged and r.num_matvecs < 300
        assert abs(float(r.eigenvector @ q[:, i])) == pytest.approx(1.0, abs=1e-8)
        assert true_residual(h, r) < 1e-8
    vectors = torch.stack([r.eigenvector for r in results])
    torch.testing.assert_close(vectors @ vectors.T, torch.eye(3, dtype=F64), atol=1e-12, rtol=0)


def test_deflated_power_iteration_from_dimension():
    h, _ = matrix([4.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    results = deflated_power_iteration(lambda v: h @ v, 4, 4, 400, generator=g, dtype=F64)
    assert [r.eigenvalue for r in results] == pytest.approx([4.0, 2.0, 1.0, 0.0], abs=1e-10)


# ------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda mv: lanczos(mv, start(5), 0), ValueError, "num_iters"),
        (lambda mv: lanczos(mv, start(5), 2.5), TypeError, "num_iters"),
        (lambda mv: lanczos(mv, start(5), 3, k=4), ValueError, "k must be <= "),
        (lambda mv: lanczos(mv, start(5), 3, k=0), ValueError, "k must be >= 1"),
        (lambda mv: lanczos(mv, start(5), 3, which="BE"), ValueError, "which"),
        (lambda mv: lanczos(mv, start(5), 3, tol=0.0), ValueError, "tol"),
        (lambda mv: lanczos(mv, torch.zeros(5, dtype=F64), 3), ValueError, "v0"),
        (lambda mv: lanczos(mv, torch.ones(5, 1, dtype=F64), 3), ValueError, "v0"),
        (lambda mv: lanczos(mv, "5", 3), TypeError, "v0"),
        (lambda mv: lanczos_tridiagonal(mv, start(5), -1), ValueError, "num_iters"),
        (lambda mv: deflated_power_iteration(mv, start(5), 6, 3), ValueError, "k must be <="),
        (lambda mv: deflated_power_iteration(mv, start(5), 2, 0), ValueError, "num_iters"),
        (lambda mv: deflated_power_iteration(mv, 0, 2, 3), ValueError, "v0"),
        (lambda mv: power_iteration(mv, start(5), 3, tol=-1.0), ValueError, "tol"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, error, name):
    h, _ = matrix([1.0, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(error, match=name):
        call(lambda v: h @ v)


def test_wrong_matvec_output_shape_and_non_finite_products_raise():
    with pytest.raises(ValueError, match="matvec must return"):
        lanczos(lambda v: v[:-1], start(5), 3)
    with pytest.raises(FloatingPointError, match="not finite"):
        lanczos(lambda v: v * float("nan"), start(5), 3)
