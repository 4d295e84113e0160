"""SAM, Eigen-SAM and X-SAM updates against their closed forms on quadratics."""

import pytest
import torch
from conftest import quadratic

from eigensam import SAM, XSAM, EigenSAM

LR, RHO = 0.1, 0.05
SPECTRUM = [5.0, 2.0, 1.0, 0.5, -0.3, 0.1]


def test_sam_matches_closed_form():
    a, b, w, closure, _ = quadratic(SPECTRUM)
    w0 = w.detach().clone()
    SAM([w], torch.optim.SGD, rho=RHO, lr=LR).step(closure)
    g = a @ w0 + b
    eps = RHO * g / g.norm()
    expected = w0 - LR * (a @ (w0 + eps) + b)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)


def test_asam_matches_closed_form():
    a, b, w, closure, _ = quadratic(SPECTRUM)
    w0 = w.detach().clone()
    SAM([w], torch.optim.SGD, rho=RHO, adaptive=True, eta=0.01, lr=LR).step(closure)
    g = a @ w0 + b
    t = w0.abs() + 0.01
    eps = RHO * t * t * g / (t * g).norm()
    expected = w0 - LR * (a @ (w0 + eps) + b)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("hvp", ["fd-forward", "fd-central", "autograd"])
def test_eigen_sam_matches_eq_7_8(hvp):
    a, b, w, closure, q = quadratic(SPECTRUM)
    w0 = w.detach().clone()
    opt = EigenSAM([w], torch.optim.SGD, rho=RHO, alpha=0.2, eig_iters=60, hvp=hvp, lr=LR)
    opt.step(closure)
    v = opt.tracker.vector
    # the tracker found the top eigenvector (largest |λ| = 5) and its eigenvalue
    assert abs(float(v @ q[:, 0])) > 1 - 1e-8
    assert opt.tracker.eigenvalue == pytest.approx(5.0, rel=1e-6)
    g = a @ w0 + b
    g_hat = g / g.norm()
    v_perp = v - (v @ g_hat) * g_hat
    eps = RHO * (g_hat + 0.2 * torch.sign(g @ v) * v_perp)
    expected = w0 - LR * (a @ (w0 + eps) + b)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)


def test_x_sam_matches_closed_form():
    a, b, w, closure, q = quadratic(SPECTRUM)
    w0 = w.detach().clone()
    opt = XSAM([w], torch.optim.SGD, rho=RHO, alpha=0.7, eig_iters=60, lr=LR)
    opt.step(closure)
    v = opt.tracker.vector
    assert abs(float(v @ q[:, 0])) > 1 - 1e-8
    g = a @ w0 + b
    g2 = a @ (w0 + RHO * g / g.norm()) + b
    expected = w0 - LR * (g2 - 0.7 * (g2 @ v) * v)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)


def test_x_sam_is_sign_invariant_and_alpha_zero_is_sam():
    results = []
    for flip, alpha in [(1, 1.0), (-1, 1.0), (1, 0.0)]:
        _, _, w, closure, q = quadratic(SPECTRUM)
        opt = XSAM([w], torch.optim.SGD, rho=RHO, alpha=alpha, eig_interval=1000, lr=LR)
        opt.tracker.vector = flip * q[:, 0].clone()
        opt.tracker.interval = 10**9  # keep the planted vector: never due after step 0
        opt.sam_steps = 1
        opt.step(closure)
        results.append(w.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-14)
    _, _, w, closure, _ = quadratic(SPECTRUM)
    SAM([w], torch.optim.SGD, rho=RHO, lr=LR).step(closure)
    torch.testing.assert_close(results[2], w.detach(), rtol=0, atol=0)


def test_eigen_sam_alpha_zero_is_sam():
    _, _, w1, c1, _ = quadratic(SPECTRUM)
    _, _, w2, c2, _ = quadratic(SPECTRUM)
    opt1 = EigenSAM([w1], torch.optim.SGD, rho=RHO, alpha=0.0, eig_interval=2, lr=LR)
    opt2 = SAM([w2], torch.optim.SGD, rho=RHO, lr=LR)
    for _ in range(5):
        opt1.step(c1)
        opt2.step(c2)
    torch.testing.assert_close(w1.detach(), w2.detach(), rtol=0, atol=1e-14)


def test_negative_dominant_eigenvalue_is_reported_with_sign():
    """Power iteration locks on λ = −8 (largest magnitude) and says so; Lanczos finds +3."""
    spectrum = [3.0, 1.0, 0.5, -8.0]
    _, _, w, closure, q = quadratic(spectrum)
    opt = EigenSAM([w], torch.optim.SGD, rho=RHO, eig_estimator="power", eig_iters=60, lr=LR)
    opt.step(closure)
    assert opt.tracker.eigenvalue == pytest.approx(-8.0, rel=1e-6)
    assert abs(float(opt.tracker.vector @ q[:, 3])) > 1 - 1e-8
    _, _, w, closure, q = quadratic(spectrum)
    opt = EigenSAM([w], torch.optim.SGD, rho=RHO, eig_iters=4, eig_method="lanczos", lr=LR)
    opt.step(closure)
    assert opt.tracker.eigenvalue == pytest.approx(3.0, rel=1e-6)
    assert abs(float(opt.tracker.vector @ q[:, 0])) > 1 - 1e-6


def test_eigenvector_refreshed_every_interval_with_warm_start():
    _, _, w, closure, _ = quadratic(SPECTRUM)
    opt = EigenSAM([w], torch.optim.SGD, rho=RHO, eig_interval=3, eig_iters=2, lr=LR)
    updates = []
    for _ in range(7):
        opt.step(closure)
        updates.append(opt.tracker.num_updates)
    assert updates == [1, 1, 1, 2, 2, 2, 3]
