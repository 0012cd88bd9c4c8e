"""The fused reference ops (``stq_compiler.fused_ops``): packed layout, definitions in terms of the
unfused reference ops, fake implementations, and the CPU path (reference, no interpreter)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from stq_compiler import fused_ops, ops, tac_ops


def test_pack_int4_layout_and_round_trip():
    codes = torch.tensor([[1, -2, 7, -8, 0]], dtype=torch.int8)
    packed = fused_ops.pack_int4(codes)
    # byte j: code 2j in the low nibble, code 2j + 1 in the high nibble; odd K padded with 0
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xE1, 0x87, 0x00]]
    assert torch.equal(fused_ops.unpack_int4(packed, 5), codes)
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 7, 64):
        c = torch.randint(-8, 8, (3, 4, k), dtype=torch.int8, generator=gen)
        assert torch.equal(fused_ops.unpack_int4(fused_ops.pack_int4(c), k), c)


def test_pack_weight():
    w = ops.quantize_weight(torch.randn(6, 9), bits=4)
    pw = fused_ops.pack_weight(w)
    assert pw.q.shape == (6, 5) and pw.q.dtype == torch.uint8 and pw.in_features == 9
    assert torch.equal(pw.codes(), w.q) and pw.w_sum is w.w_sum
    w8 = ops.quantize_weight(torch.randn(6, 9), bits=8)
    assert fused_ops.pack_weight(w8).q is w8.q


def _site_inputs(m=5, k=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).bfloat16()
    kw = {
        "rms_eps": 1e-6,
        "norm_weight": (torch.rand(k, generator=gen) + 0.5).bfloat16(),
        "tac_m": torch.randn(k // 8, 8, 8, generator=gen),
        "tac_d": torch.randn(k, generator=gen),
        "inv_smooth": torch.rand(k, generator=gen) + 0.5,
        "p1": torch.linalg.qr(torch.randn(4, 4, generator=gen))[0],
        "p2": torch.linalg.qr(torch.randn(6, 6, generator=gen))[0],
        "is_masked": torch.rand(m, generator=gen) < 0.5,
        "gate_masked": (torch.rand(k, generator=gen) < 0.8).float(),
        "gate_unmasked": (torch.rand(k, generator=gen) < 0.8).float(),
    }
    return x, kw


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_quantize_reference_is_the_unfused_chain(bits):
    x, kw = _site_inputs()
    # RMSNorm in float32 (no rounding back to the model dtype)
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + kw["rms_eps"]) * kw["norm_weight"].float()
    h = tac_ops.tac_block_affine_reference(n, kw["tac_m"], kw["tac_d"]) * kw["inv_smooth"]
    h = ops.kron_transform_reference(h, kw["p1"], kw["p2"])
    q, scale, zero = ops.quantize_per_token_reference(h, bits, kw["is_masked"], kw["gate_masked"], kw["gate_unmasked"])
    got = torch.ops.stq.fused_quantize(x, bits, **kw)  # CPU without the interpreter: the reference
    assert torch.equal(fused_ops.codes_of(got[0], 24), q)
    assert torch.equal(got[1], scale) and torch.equal(got[2], zero)
    if bits == 4:
        assert got[0].shape == (5, 12) and got[0].dtype == torch.uint8


@pytest.mark.parametrize("a_bits,w_bits", [(4, 4), (8, 8), (8, 4)])
def test_fused_linear_reference_is_quantized_linear_then_epilogue(a_bits, w_bits):
    gen = torch.Generator().manual_seed(a_bits * 10 + w_bits)
    x = torch.randn(2, 3, 21, generator=gen)
    w = ops.quantize_weight(torch.randn(10, 21, generator=gen), bits=w_bits)
    pw = fused_ops.pack_weight(w)
    xq, s, z = ops.quantize_per_token_reference(x, a_bits)
    x_store = fused_ops.pack_int4(xq) if a_bits == 4 else xq
    bias = torch.randn(10, generator=gen)
    base = ops.quantized_linear_reference(xq, s, z, w.q, w.scale, w.w_sum, bias, torch.float32)
    y = torch.ops.stq.fused_linear(x_store, s, z, pw.q, pw.scale, pw.w_sum, bias, None, False, torch.float32)
    assert torch.equal(y, base)
    y = torch.ops.stq.fused_linear(x_store, s, z, pw.q, pw.scale, pw.w_sum, bias, None, True, torch.bfloat16)
    assert torch.equal(y, (torch.nn.functional.silu(base[..., :5]) * base[..., 5:]).bfloat16())
    res = torch.randn(2, 3, 10, generator=gen).half()
    y = torch.ops.stq.fused_linear(x_store, s, z, pw.q, pw.scale, pw.w_sum, bias, res, False, torch.float16)
    assert torch.equal(y, (base + res.float()).half())


def test_fake_implementations_give_shapes_and_dtypes():
    x, kw = _site_inputs(m=6, k=24)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x.reshape(2, 3, 24))
        kw = {**kw, "is_masked": kw["is_masked"].reshape(2, 3)}
        q, s, z = torch.ops.stq.fused_quantize(fx, 4, **kw)
        assert q.shape == (2, 3, 12) and q.dtype == torch.uint8
        assert s.shape == z.shape == (2, 3, 1) and s.dtype == torch.float32 and z.dtype == torch.int32
        w = torch.empty(10, 12, dtype=torch.uint8)
        y = torch.ops.stq.fused_linear(q, s, z, w, torch.ones(10), torch.zeros(10, dtype=torch.int32), None, None, True, torch.bfloat16)
        assert y.shape == (2, 3, 5) and y.dtype == torch.bfloat16


def test_ops_refuse_what_does_not_fit():
    x, kw = _site_inputs()
    with pytest.raises(ValueError, match="even d2"):
        torch.ops.stq.fused_quantize(torch.randn(2, 15), 4, p1=torch.eye(5), p2=torch.eye(3))
    with pytest.raises(ValueError, match="norm weight"):
        torch.ops.stq.fused_quantize(x, 4, norm_weight=kw["norm_weight"])
    with pytest.raises(ValueError):
        torch.ops.stq.fused_quantize(x, 3)
    q8 = torch.zeros(2, 8, dtype=torch.int8)
    w4 = torch.zeros(4, 5, dtype=torch.uint8)  # 9 or 10 features, not 8
    one = torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32), torch.ones(4), torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="same number of input features"):
        torch.ops.stq.fused_linear(q8, one[0], one[1], w4, one[2], one[3], None, None, False, torch.float32)
    with pytest.raises(ValueError, match="SwiGLU or a residual"):
        torch.ops.stq.fused_linear(q8, one[0], one[1], w4[:, :4], one[2], one[3], None, torch.ones(2, 2), True, torch.float32)


def test_compiles_on_cpu_with_the_reference():
    x, kw = _site_inputs()
    w = fused_ops.pack_weight(ops.quantize_weight(torch.randn(16, 24), bits=4))

    def site(x):
        q, s, z = torch.ops.stq.fused_quantize(x, 4, **kw)
        return torch.ops.stq.fused_linear(q, s, z, w.q, w.scale, w.w_sum, None, None, True, torch.bfloat16)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(site, fullgraph=True, backend="aot_eager")(x), site(x))
