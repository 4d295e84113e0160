"""Align, cosines and residuals."""

import math

import pytest
import torch

from eigensam.hessian.metrics import abs_cosine, align, cosine, residual

F64 = torch.float64


def vec(seed, n=50, dtype=F64):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_align_of_a_vector_with_itself_and_its_negative_is_one():
    eps = vec(0)
    assert align(eps, eps) == pytest.approx(1.0, abs=1e-15)
    assert align(eps, -eps) == pytest.approx(1.0, abs=1e-15)
    assert align(3.0 * eps, eps / 7.0) == pytest.approx(1.0, abs=1e-15)


def test_align_of_orthogonal_vectors_is_one_minus_sqrt_two():
    a = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    b = torch.tensor([0.0, -2.0, 0.0], dtype=F64)
    assert align(a, b) == pytest.approx(1.0 - math.sqrt(2.0), abs=1e-15)
    assert cosine(a, b) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_align_equals_the_abs_cosine_formula(seed):
    eps, v1 = vec(seed), vec(seed + 100)
    v1 = v1 + (2 * seed - 5) * eps  # a range of alignments, both signs
    c = abs_cosine(eps, v1)
    assert align(eps, v1) == pytest.approx(1.0 - math.sqrt(2.0 - 2.0 * c), abs=1e-12)
    assert align(eps, v1) == pytest.approx(align(eps, -v1), abs=1e-15)
    assert align(eps, v1) == pytest.approx(align(v1, eps), abs=1e-15)


def test_align_keeps_precision_for_nearly_aligned_vectors():
    eps = vec(0)
    perturbed = eps + 1e-9 * vec(1)
    expected = float(((eps / eps.norm()) - perturbed / perturbed.norm()).norm())
    assert 1.0 - align(eps, perturbed) == pytest.approx(expected, rel=1e-6)


def test_cosine_and_abs_cosine():
    a = torch.tensor([1.0, 1.0], dtype=F64)
    b = torch.tensor([-1.0, 0.0], dtype=F64)
    assert cosine(a, b) == pytest.approx(-1 / math.sqrt(2))
    assert abs_cosine(a, b) == pytest.approx(1 / math.sqrt(2))
    assert cosine(a, a) <= 1.0 and cosine(a, -a) >= -1.0


def test_metrics_accept_parameter_lists_and_float32():
    parts = [vec(0, 6, torch.float32).reshape(2, 3), vec(1, 4, torch.float32)]
    flat = torch.cat([p.reshape(-1) for p in parts])
    assert align(parts, flat) == pytest.approx(1.0, abs=1e-6)
    assert cosine(parts, -flat) == pytest.approx(-1.0, abs=1e-6)


def test_residual_of_exact_and_perturbed_eigenvectors():
    lam = torch.tensor([4.0, 1.0, -2.0], dtype=F64)
    h = torch.diag(lam)
    e1 = torch.tensor([5.0, 0.0, 0.0], dtype=F64)  # not unit: normalized first
    assert residual(lambda v: h @ v, e1, 4.0) == pytest.approx(0.0, abs=1e-15)
    assert residual(lambda v: h @ v, e1, 3.0) == pytest.approx(1.0, abs=1e-15)
    v = torch.tensor([1.0, 1.0, 0.0], dtype=F64)
    expected = float((h @ v / math.sqrt(2) - 2.0 * v / math.sqrt(2)).norm())
    assert residual(lambda x: h @ x, v, 2.0) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: align(torch.zeros(3), torch.ones(3)), ValueError, "eps"),
        (lambda: align(torch.ones(3), torch.zeros(3)), ValueError, "v1"),
        (lambda: align(torch.ones(3), torch.ones(4)), ValueError, "same number of elements"),
        (lambda: cosine(torch.ones(3), torch.ones(2)), ValueError, "same number of elements"),
        (lambda: cosine(torch.ones(3), torch.zeros(3)), ValueError, "b must be a finite nonzero"),
        (lambda: abs_cosine([], torch.ones(3)), TypeError, "a must be"),
        (lambda: cosine(torch.ones(3, dtype=torch.int64), torch.ones(3)), TypeError, "a must"),
        (lambda: align(torch.tensor([math.nan, 1.0]), torch.ones(2)), ValueError, "eps"),
        (lambda: residual(lambda v: v, torch.zeros(3), 1.0), ValueError, "v must"),
        (lambda: residual(lambda v: v, torch.ones(3), math.inf), ValueError, "eigenvalue"),
        (lambda: residual(lambda v: v[:2], torch.ones(3), 1.0), ValueError, "matvec"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
