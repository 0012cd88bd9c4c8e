"""TAC: the closed-form fit against a per-block float64 loop written from METHOD.md §4, the
streaming statistics against the one-shot fit, and ``stq::tac_block_affine`` against einsum."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stq_compiler.calibration.tac import TacParams, TacStatistics, fit_tac, tac_group_size
from stq_compiler.tac_ops import tac_block_affine  # noqa: F401  (registers the op)


def method_fit(z_ref, z_q, g):
    """METHOD.md §4 steps 2-7, one block at a time, float64, constants written out."""
    c = z_ref.shape[-1]
    zr, zq = z_ref.reshape(-1, c).double(), z_q.reshape(-1, c).double()
    eye = torch.eye(g, dtype=torch.float64)

    def power(a, p):
        w, v = torch.linalg.eigh(a)
        return v @ torch.diag(w.clamp(min=1e-12) ** p) @ v.T

    ms, ds = [], []
    for b in range(c // g):
        xr, xq = zr[:, b * g : (b + 1) * g], zq[:, b * g : (b + 1) * g]
        mu_r, mu_q = xr.mean(0), xq.mean(0)
        cov_r = (xr - mu_r).T @ (xr - mu_r) / xr.shape[0]
        cov_q = (xq - mu_q).T @ (xq - mu_q) / xq.shape[0]
        lam = 3e-4 * max(torch.trace(cov_q).item() / g, 1e-8)
        m = power(cov_r, 0.5) @ power(cov_q + lam * eye, -0.5)
        u, s, vh = torch.linalg.svd(m)
        s = 0.85 * s + 0.15 * s.mean()
        m = 0.45 * (u @ torch.diag(s) @ vh) + 0.55 * eye
        ms.append(m)
        ds.append(mu_r - m @ mu_q)
    return torch.stack(ms), torch.cat(ds)


def correlated_pair(tokens, c, seed, mean_scale=3.0):
    """Z_ref with correlated channels and nonzero means; Ẑ a distorted, noisy, shifted copy."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=gen, dtype=torch.float64) / c**0.5 + torch.eye(c, dtype=torch.float64)
    z_ref = torch.randn(tokens, c, generator=gen, dtype=torch.float64) @ mix
    z_ref = z_ref + mean_scale * torch.randn(c, generator=gen, dtype=torch.float64)
    distort = torch.eye(c, dtype=torch.float64) + 0.2 * torch.randn(c, c, generator=gen, dtype=torch.float64) / c**0.5
    z_q = z_ref @ distort + 0.1 * torch.randn(tokens, c, generator=gen, dtype=torch.float64)
    z_q = z_q + 0.05 * torch.randn(c, generator=gen, dtype=torch.float64)
    return z_ref, z_q


@pytest.mark.parametrize(
    "channels, group", [(64, 16), (40, 10), (48, 16), (24, 12), (17, 1), (4096, 16), (3584, 16), (16, 16), (8, 8)]
)
def test_group_size_is_largest_divisor_up_to_16(channels, group):
    assert tac_group_size(channels) == group


@pytest.mark.parametrize("channels", [16, 40, 64, 96])
def test_fit_matches_per_block_float64_loop(channels):
    z_ref, z_q = correlated_pair(3000, channels, seed=channels)
    g = tac_group_size(channels)
    params = fit_tac(z_ref, z_q, dtype=torch.float64)
    m_ref, d_ref = method_fit(z_ref, z_q, g)
    assert params.M.shape == (channels // g, g, g) and params.d.shape == (channels,)
    torch.testing.assert_close(params.M, m_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(params.d, d_ref, rtol=0, atol=1e-10)
    # the stored (float32) parameters are the same numbers, rounded
    stored = fit_tac(z_ref.float(), z_q.float())
    assert stored.M.dtype == stored.d.dtype == torch.float32
    torch.testing.assert_close(stored.M.double(), m_ref, rtol=0, atol=1e-5)


def test_explicit_group_and_leading_dims():
    z_ref, z_q = correlated_pair(600, 32, seed=1)
    params = fit_tac(z_ref.reshape(4, 150, 32), z_q.reshape(4, 150, 32), group=8, dtype=torch.float64)
    m_ref, d_ref = method_fit(z_ref, z_q, 8)
    torch.testing.assert_close(params.M, m_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(params.d, d_ref, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="does not divide"):
        fit_tac(z_ref, z_q, group=5)


@pytest.mark.parametrize("mean_scale", [3.0, 1e3])
def test_streaming_statistics_agree_with_one_shot_fit(mean_scale):
    z_ref, z_q = correlated_pair(2000, 40, seed=7, mean_scale=mean_scale)
    stats = TacStatistics(40)
    for lo, hi in ((0, 1), (1, 300), (300, 300), (300, 1100), (1100, 2000)):
        stats.update(z_ref[lo:hi], z_q[lo:hi])  # uneven batches, one of one token, one empty
    assert stats.count == 2000
    streamed = stats.fit(dtype=torch.float64)
    once = fit_tac(z_ref, z_q, dtype=torch.float64)
    m_ref, d_ref = method_fit(z_ref, z_q, 10)
    # A mean 1e3 times the spread costs ~1e-16 · 1e6 in a raw E[xxᵀ] − μμᵀ; the shifted sums keep it.
    for p in (streamed, once):
        torch.testing.assert_close(p.M, m_ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(p.d, d_ref, rtol=0, atol=1e-10 * mean_scale)
    with pytest.raises(ValueError, match="same tokens"):
        stats.update(z_ref[:5], z_q[:6])
    with pytest.raises(ValueError, match="no tokens"):
        TacStatistics(40).fit()


def test_identical_inputs_give_nearly_the_identity():
    """With Ẑ = Z_ref, M = f(Σ^{1/2}(Σ + λI)^{-1/2}): per eigenvalue w of Σ the unshrunk map has
    singular value sqrt(w / (w + λ)) ∈ [1 - λ/(2 w_min), 1]; smoothing keeps the singular values in
    that range and the shrink scales the distance to I by 0.45. So ‖M - I‖₂ ≤ 0.45 λ / (2 w_min)
    and ‖d‖ = ‖(I - M) μ‖ ≤ ‖M - I‖₂ ‖μ‖, per block."""
    z, _ = correlated_pair(4000, 64, seed=3)
    params = fit_tac(z, z, dtype=torch.float64)
    blocks = z.reshape(-1, 4, 16)
    mu = blocks.mean(0)
    centered = blocks - mu
    cov = torch.einsum("tbi,tbj->bij", centered, centered) / z.shape[0]
    w = torch.linalg.eigvalsh(cov)
    lam = 3e-4 * w.sum(-1) / 16
    bound = 0.45 * lam / (2 * w[:, 0])
    eye = torch.eye(16, dtype=torch.float64)
    dev = torch.linalg.matrix_norm(params.M - eye, ord=2)
    assert (dev <= bound * (1 + 1e-9)).all() and (dev > 0).all(), (dev, bound)
    assert (params.d.reshape(4, 16).norm(dim=-1) <= dev * mu.norm(dim=-1) * (1 + 1e-9) + 1e-12).all()
    assert bound.max() < 1e-2  # the bound itself is tight enough to mean "close to I"


def test_identity_params():
    p = TacParams.identity(40)
    assert p.group == 10 and p.channels == 40 and p.nbytes == (4 * 10 * 10 + 40) * 4
    assert torch.equal(p.M, torch.eye(10).expand(4, 10, 10)) and not p.d.any()
    with pytest.raises(ValueError, match="does not divide"):
        TacParams.identity(40, group=16)


# ----------------------------------------------------------------------------------------------
# stq::tac_block_affine


def einsum_tac(z, M, d):
    nb, g = M.shape[0], M.shape[1]
    zb = z.double().reshape(*z.shape[:-1], nb, g)
    return (torch.einsum("...bj,bij->...bi", zb, M.double()).reshape(z.shape) + d.double())


shapes = st.tuples(
    st.lists(st.integers(0, 4), min_size=0, max_size=2),  # leading dims (0 tokens included)
    st.integers(1, 4),  # blocks
    st.integers(1, 8),  # g
    st.integers(0, 2**31 - 1),  # seed
)


@settings(max_examples=20, deadline=None)
@given(shapes, st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
def test_op_identity_is_exact_and_matches_einsum(shape, dtype):
    lead, nb, g, seed = shape
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(*lead, nb * g, generator=gen) * 10).to(dtype)
    identity = TacParams.identity(nb * g, g)
    out = torch.ops.stq.tac_block_affine(z, identity.M, identity.d)
    assert out.dtype == dtype and out.shape == z.shape and torch.equal(out, z)

    z64 = z.double()
    M = torch.randn(nb, g, g, generator=gen)
    d = torch.randn(nb * g, generator=gen)
    torch.testing.assert_close(torch.ops.stq.tac_block_affine(z64, M, d), einsum_tac(z64, M, d), rtol=1e-12, atol=1e-12)
    # float32 compute for a float32 activation
    z32 = z.float()
    torch.testing.assert_close(
        torch.ops.stq.tac_block_affine(z32, M, d).double(), einsum_tac(z32, M, d), rtol=1e-5, atol=1e-5
    )


def test_op_argument_checks_and_fake():
    z, M, d = torch.randn(3, 40), torch.randn(4, 10, 10), torch.randn(40)
    with pytest.raises(ValueError, match="not divisible by the block size g=16"):
        torch.ops.stq.tac_block_affine(z, torch.randn(2, 16, 16), torch.randn(40))
    with pytest.raises(ValueError, match="holds 3 blocks of 10 channels"):
        torch.ops.stq.tac_block_affine(z, torch.randn(3, 10, 10), d)
    with pytest.raises(ValueError, match=r"d must have shape \(40,\)"):
        torch.ops.stq.tac_block_affine(z, M, torch.randn(41))
    with pytest.raises(ValueError, match=r"M must have shape \[C//g, g, g\]"):
        torch.ops.stq.tac_block_affine(z, torch.randn(4, 10, 9), d)
    with pytest.raises(TypeError, match="floating-point"):
        torch.ops.stq.tac_block_affine(z.int(), M, d)
    torch.library.opcheck(torch.ops.stq.tac_block_affine.default, (torch.randn(2, 5, 40).transpose(0, 1), M, d))


def test_calibration_error_is_the_direct_mean_squared_error():
    """The closed forms (fitted: tr Σ_r − 2 tr(M Σ_qr) + tr(M Σ_q Mᵀ); identity: tr Σ_r + tr Σ_q −
    2 tr Σ_qr + ‖μ_r − μ_q‖²) against ‖z_ref − (M ẑ + d)‖² averaged over the tokens, streamed."""
    z_ref, z_q = correlated_pair(3000, 48, seed=11, mean_scale=1e3)
    stats = TacStatistics(48)
    for lo, hi in ((0, 1), (1, 700), (700, 700), (700, 3000)):
        stats.update(z_ref[lo:hi], z_q[lo:hi])
    params = stats.fit(dtype=torch.float64)
    fitted, identity = stats.calibration_error(params)
    zr, zq = z_ref.reshape(-1, 3, 16), z_q.reshape(-1, 3, 16)
    mapped = torch.einsum("tbj,bij->tbi", zq, params.M) + params.d.reshape(3, 16)
    torch.testing.assert_close(fitted, (zr - mapped).pow(2).sum(-1).mean(0), rtol=1e-7, atol=0)
    torch.testing.assert_close(identity, (zr - zq).pow(2).sum(-1).mean(0), rtol=1e-9, atol=0)
    assert (fitted < identity).all()  # a distorted copy: the fit helps on every block


def test_keep_where_better_falls_back_to_the_identity_on_undistorted_blocks():
    """Blocks where Ẑ = Z_ref keep the identity (the fit's damping makes it a shade worse there);
    distorted blocks keep the fit."""
    z_ref, z_q = correlated_pair(2000, 32, seed=5)
    z_q[:, :16] = z_ref[:, :16]
    stats = TacStatistics(32)
    stats.update(z_ref, z_q)
    params, keep = stats.keep_where_better(stats.fit())
    assert keep.tolist() == [False, True]
    assert torch.equal(params.M[0], torch.eye(16)) and not params.d[:16].any()
    assert torch.equal(params.M[1], stats.fit().M[1])
    with pytest.raises(ValueError, match="as a pair"):
        unpaired = TacStatistics(32)
        unpaired.add("ref", z_ref)
        unpaired.add("q", z_q)
        unpaired.cross_covariance()
