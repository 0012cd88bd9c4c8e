"""Rotations, Kronecker-factored application and SmoothQuant scales, checked in float64."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stq_compiler.calibration.transforms import (
    hadamard_matrix,
    kron_apply,
    kronecker_factors,
    random_hadamard,
    random_orthogonal,
    smoothquant_scales,
)

SIZES = (1, 2, 8, 64, 96, 56, 12)


def assert_orthogonal(p):
    eye = torch.eye(p.shape[0], dtype=torch.float64)
    assert p.dtype == torch.float64
    assert (p @ p.t() - eye).abs().max().item() <= 1e-12
    assert (p.t() @ p - eye).abs().max().item() <= 1e-12


@pytest.mark.parametrize("n", SIZES)
def test_rotations_are_orthogonal(n):
    gen = torch.Generator().manual_seed(n)
    assert_orthogonal(random_orthogonal(n, generator=gen))
    assert_orthogonal(random_hadamard(n, generator=gen))
    if n & (n - 1) == 0:
        h = hadamard_matrix(n)
        assert_orthogonal(h)
        assert torch.equal(h, h.t())
        assert torch.all(h.abs() == 1 / math.sqrt(n))
    else:
        with pytest.raises(ValueError):
            hadamard_matrix(n)


def test_random_hadamard_of_a_power_of_two_spreads_an_outlier_evenly():
    gen = torch.Generator().manual_seed(0)
    h = random_hadamard(64, generator=gen)
    # Columns are Sylvester's up to sign: every entry ±1/8, and not all columns kept their sign.
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / 8), rtol=0, atol=1e-15)
    assert not torch.equal(h, hadamard_matrix(64))


def test_random_matrices_follow_the_generator():
    a = random_hadamard(96, generator=torch.Generator().manual_seed(3))
    b = random_hadamard(96, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    c = random_hadamard(96, generator=torch.Generator().manual_seed(4))
    assert b.dtype == torch.float32 and torch.equal(a.float(), b)
    assert not torch.equal(a, c)
    q1 = random_orthogonal(12, generator=torch.Generator().manual_seed(5))
    q2 = random_orthogonal(12, generator=torch.Generator().manual_seed(5))
    assert torch.equal(q1, q2)


@pytest.mark.parametrize(
    "d, factors",
    [(4096, (64, 64)), (12288, (96, 128)), (3584, (56, 64)), (18944, (128, 148)), (1, (1, 1)), (13, (1, 13))],
)
def test_kronecker_factors_examples(d, factors):
    assert kronecker_factors(d) == factors


def test_kronecker_factors_are_the_most_balanced_split():
    for d in range(1, 2049):
        d1, d2 = kronecker_factors(d)
        assert d1 * d2 == d and d1 <= d2
        assert not any(d % c == 0 for c in range(d1 + 1, math.isqrt(d) + 1))


@settings(max_examples=30, deadline=None)
@given(
    d1=st.integers(1, 8),
    d2=st.integers(1, 8),
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_kron_apply_equals_dense_kronecker(d1, d2, lead, seed):
    gen = torch.Generator().manual_seed(seed)
    # General (non-orthogonal, non-symmetric) factors, so a transposed index would show.
    p1 = torch.randn(d1, d1, generator=gen, dtype=torch.float64)
    p2 = torch.randn(d2, d2, generator=gen, dtype=torch.float64)
    x = torch.randn(*lead, d1 * d2, generator=gen, dtype=torch.float64)
    got = kron_apply(x, p1, p2)
    expected = x @ torch.kron(p1, p2)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-12 * max(1.0, expected.abs().max().item())


def test_kron_apply_refuses_mismatched_shapes():
    with pytest.raises(ValueError):
        kron_apply(torch.randn(2, 12), torch.eye(3), torch.eye(5))


def test_smoothquant_folding_is_exact():
    x = torch.randn(40, 32, dtype=torch.float64) * torch.logspace(-2, 2, 32, dtype=torch.float64)
    w = torch.randn(24, 32, dtype=torch.float64)
    for alpha in (0.0, 0.5, 0.85, 1.0):
        s = smoothquant_scales(x.abs().amax(0), w.abs().amax(0), alpha=alpha)
        assert s.dtype == torch.float64 and torch.all(s > 0) and torch.all(torch.isfinite(s))
        y = x @ w.t()
        y_folded = (x / s) @ (w * s).t()
        assert ((y_folded - y).norm() / y.norm()).item() <= 1e-12


def test_smoothquant_scale_values():
    act = torch.tensor([4.0, 0.0, 9.0, 1.0, float("inf"), 2.0])
    wgt = torch.tensor([1.0, 2.0, 0.0, 4.0, 1.0, float("nan")])
    s = smoothquant_scales(act, wgt, alpha=0.5)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 1.0, 0.5, 1.0, 1.0]))
    # alpha = 1 moves everything to the weight (s = max|X|); alpha = 0 everything to the activation.
    torch.testing.assert_close(smoothquant_scales(act[:1], wgt[:1] * 3, alpha=1.0), torch.tensor([4.0]))
    torch.testing.assert_close(smoothquant_scales(act[:1], wgt[:1] * 4, alpha=0.0), torch.tensor([0.25]))
    # Extreme ratios stay within [eps, 1/eps].
    s = smoothquant_scales(torch.tensor([1e-30, 1e30]), torch.tensor([1e30, 1e-30]), eps=1e-5)
    torch.testing.assert_close(s, torch.tensor([1e-5, 1e5]))
