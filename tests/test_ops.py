"""The stq:: custom ops against float64 computations of the same integer arithmetic."""

import pytest
import torch

import stq_compiler  # noqa: F401  (registers the ops)
from stq_compiler.ops import act_qrange, quantize_weight, weight_qmax


def float64_quantize(x, bits, gate=None):
    """Per-token asymmetric quantization written independently, in float64."""
    qmin, qmax = act_qrange(bits)
    x = x.double() if gate is None else x.double() * gate.double()
    lo = x.min(-1, keepdim=True).values.clamp(max=0)
    hi = x.max(-1, keepdim=True).values.clamp(min=0)
    # The op defines the scale in float32; take it as given and check everything that follows.
    scale = ((hi - lo).float() / float(2**bits - 1)).double()
    scale[scale == 0] = 1.0
    ratio = x / scale
    zero = qmin - torch.floor(lo / scale + 0.5)
    q = (torch.floor(ratio + 0.5) + zero).clamp(qmin, qmax)
    return q, scale, zero, ratio


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 5, 64), (2, 33)])
def test_quantize_per_token_matches_float64(bits, shape):
    x = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 4
    x[..., 0] += 20.0  # an outlier channel
    q, scale, zero = torch.ops.stq.quantize_per_token(x, bits)
    q64, scale64, zero64, ratio = float64_quantize(x, bits)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and zero.dtype == torch.int32
    assert torch.equal(scale.double(), scale64)
    assert torch.equal(zero.double(), zero64)
    # float32 and float64 divisions round differently only within one float32 ulp of a half-integer
    frac = (ratio - torch.floor(ratio)).sub(0.5).abs()
    near_tie = frac < 1e-6 * ratio.abs().clamp(min=1)
    assert torch.equal(q.double()[~near_tie], q64[~near_tie])
    assert near_tie.float().mean() < 0.01
    # and the dequantized value is within half a step of the input; at the range's ends the two
    # roundings (of x/scale and of the zero point) can add up to one step, which the clamp cuts.
    err = ((q.double() - zero.double()) * scale.double() - x.double()).abs()
    qmin, qmax = act_qrange(bits)
    at_end = (q == qmin) | (q == qmax)
    assert (err[~at_end] <= (scale.double() / 2 * (1 + 1e-5)).expand_as(err)[~at_end]).all()
    assert (err <= scale.double() * (1 + 1e-5)).all()


def test_quantize_all_zero_token_and_gates():
    x = torch.randn(4, 16)
    x[1] = 0
    q, scale, zero = torch.ops.stq.quantize_per_token(x, 8)
    assert scale[1].item() == 1.0 and (q[1] == zero[1]).all()

    is_masked = torch.tensor([True, False, True, False])
    g_m = (torch.rand(16) > 0.2).float()
    g_u = (torch.rand(16) > 0.2).float()
    q, scale, zero = torch.ops.stq.quantize_per_token(x, 4, is_masked, g_m, g_u)
    gate = torch.where(is_masked[:, None], g_m, g_u)
    q64, scale64, zero64, _ = float64_quantize(x, 4, gate)
    assert torch.equal(scale.double(), scale64) and torch.equal(zero.double(), zero64)
    dequant = (q.double() - zero.double()) * scale.double()
    assert (dequant[gate == 0] == 0).all()  # gated-off columns carry nothing


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 4), (4, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_linear_integer_arithmetic_is_exact(w_bits, a_bits, bias):
    m, k, n = 37, 96, 24
    x = torch.randn(m, k)
    w = torch.randn(n, k)
    b = torch.randn(n) if bias else None
    qw = quantize_weight(w, w_bits)
    xq, xs, xz = torch.ops.stq.quantize_per_token(x, a_bits)
    y = torch.ops.stq.quantized_linear(xq, xs, xz, qw.q, qw.scale, qw.w_sum, b, torch.float32)

    acc64 = xq.double() @ qw.q.double().t() - xz.double() * qw.q.double().sum(1)
    ref = acc64 * xs.double() * qw.scale.double()
    if bias:
        ref = ref + b.double()
    # Exact integers, then two float32 products (and a bias add): a few float32 ulps.
    assert torch.allclose(y.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    # Unit scales expose the integer accumulator itself: it must be exact.
    ones_x, ones_w = torch.ones_like(xs), torch.ones_like(qw.scale)
    acc = torch.ops.stq.quantized_linear(xq, ones_x, xz, qw.q, ones_w, qw.w_sum, None, torch.float64)
    assert torch.equal(acc, acc64)


def test_quantize_weight_is_symmetric_per_channel():
    w = torch.randn(8, 32)
    w[3] *= 100
    for bits in (4, 8):
        qw = quantize_weight(w, bits)
        qmax = weight_qmax(bits)
        assert qw.q.abs().max() == qmax
        assert torch.equal(qw.scale.double(), (w.abs().amax(1) / qmax).double())
        assert ((qw.dequantize() - w).abs() <= qw.scale[:, None] / 2 * (1 + 1e-5)).all()
        assert torch.equal(qw.w_sum, qw.q.int().sum(1, dtype=torch.int32))
        # a few rows at a time (bounds the float32 temporaries of an 8B head): the same result
        chunked = quantize_weight(w.half(), bits, chunk_rows=3)
        whole = quantize_weight(w.half(), bits, chunk_rows=8)
        assert all(torch.equal(a, b) for a, b in ((chunked.q, whole.q), (chunked.scale, whole.scale), (chunked.w_sum, whole.w_sum)))


def test_fake_implementations_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 64, dtype=torch.bfloat16)
        q, s, z = torch.ops.stq.quantize_per_token(x, 4)
        assert q.shape == x.shape and s.shape == (2, 5, 1) and z.dtype == torch.int32
        wq = torch.empty(48, 64, dtype=torch.int8)
        y = torch.ops.stq.quantized_linear(q, s, z, wq, torch.empty(48), torch.empty(48, dtype=torch.int32), None, torch.bfloat16)
        assert y.shape == (2, 5, 48) and y.dtype == torch.bfloat16


def test_bad_inputs_name_the_problem():
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="bit width 3"):
        torch.ops.stq.quantize_per_token(x, 3)
    with pytest.raises(TypeError, match="floating-point"):
        torch.ops.stq.quantize_per_token(x.long(), 8)
    with pytest.raises(ValueError, match="is_masked"):
        torch.ops.stq.quantize_per_token(x, 8, None, torch.ones(16), torch.ones(16))
    xq, xs, xz = torch.ops.stq.quantize_per_token(x, 8)
    qw = quantize_weight(torch.randn(4, 12), 8)
    with pytest.raises(ValueError, match="16 input features but the weight"):
        torch.ops.stq.quantized_linear(xq, xs, xz, qw.q, qw.scale, qw.w_sum, None, torch.float32)
    with pytest.raises(ValueError, match="2-D weight"):
        quantize_weight(torch.randn(4), 8)


def test_embedding_rows_match_float64():
    from stq_compiler.ops import embedding_int8, quantize_embedding_rows

    w = torch.randn(50, 48) * torch.rand(50, 1) * 3
    w[7] *= 1000.0  # an outlier row: its scale is its own
    w[11] = 0.0  # a zero row: scale 1, codes 0
    codes, scale = quantize_embedding_rows(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape and scale.dtype == torch.float32 and scale.shape == (50,)
    assert scale[11] == 1.0 and not codes[11].any()
    rows = torch.arange(50) != 11
    w64 = w.double()
    # scale = max|row| / 127, divided in float32: one rounding from the float64 quotient
    torch.testing.assert_close(scale[rows].double(), w64.abs().amax(1)[rows] / 127, rtol=2**-23, atol=0)
    assert (codes[rows].abs().amax(1) == 127).all() and codes.abs().max() <= 127
    # codes: round to nearest of w / scale in float64, with the op's scale taken as given
    ratio = w64 / scale.double()[:, None]
    codes64 = torch.floor(ratio + 0.5).clamp(-127, 127)
    near_tie = (ratio - torch.floor(ratio) - 0.5).abs() < 1e-5
    assert torch.equal(codes.double()[~near_tie], codes64[~near_tie])
    # rounding to nearest: every element within half a step of the float row
    error = (codes.double() * scale.double()[:, None] - w64).abs()
    assert (error <= scale.double()[:, None] / 2 * (1 + 1e-5)).all()
    # chunking the rows changes nothing
    chunked = quantize_embedding_rows(w, chunk_rows=7)
    assert torch.equal(chunked[0], codes) and torch.equal(chunked[1], scale)

    ids = torch.randint(0, 50, (3, 4, 5))
    ids[0, 0] = 11
    ids[1, 2, 3] = 7
    # an int8 code times a float32 scale is exact in float64: the float32 result is that, rounded once
    reference = codes.double()[ids] * scale.double()[ids][..., None]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = embedding_int8(codes, scale, ids, dtype)
        assert out.shape == (3, 4, 5, 48) and out.dtype == dtype
        assert torch.equal(out, reference.float().to(dtype))
    assert not embedding_int8(codes, scale, ids, torch.float32)[0, 0].any()
    assert torch.equal(embedding_int8(codes, scale, torch.tensor(7), torch.float32), reference[1, 2, 3].float())


def test_embedding_rows_trace_on_fake_tensors_and_refuse_bad_tables():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from stq_compiler.ops import embedding_int8, quantize_embedding_rows

    with FakeTensorMode():
        out = embedding_int8(torch.empty(100, 32, dtype=torch.int8), torch.empty(100), torch.empty(2, 7, dtype=torch.long), torch.bfloat16)
        assert out.shape == (2, 7, 32) and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="2-D floating-point table"):
        quantize_embedding_rows(torch.randn(10))
    with pytest.raises(ValueError, match="2-D floating-point table"):
        quantize_embedding_rows(torch.ones(4, 4, dtype=torch.long))
