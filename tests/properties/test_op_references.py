"""The stq ops agree with float64 references of their arithmetic, over random shapes, bit widths,
dtypes, magnitudes, gates and degenerate tokens.

The integer ops are checked for exact equality: the references compute in float64 and round to
float32 after each step where the op computes in float32 (``f32``). A float64 quotient or product
of float32 values rounded to float32 is the correctly rounded float32 result (53 ≥ 2·24 + 2, so
double rounding is innocuous), so reference and op must agree bit for bit: codes, scales, zero
points, outputs. (tests/test_ops.py checks fixed shapes and allows codes to differ at near-ties;
this pins the float32 steps themselves.) The float ops (TAC, Kronecker transform) are checked
against the float32 forward error bound of their sums, and the TAC map for exactness at M = I, d = 0.
"""

from __future__ import annotations

import torch
from hypothesis import given, strategies as st

import stq_compiler  # noqa: F401  (registers the ops)
import stq_compiler.tac_ops  # noqa: F401
from stq_compiler.ops import quantize_weight
from tests.conftest import examples

U32 = 2.0**-24  # unit roundoff of float32


def f32(t: torch.Tensor) -> torch.Tensor:
    """Round to float32, keep computing in float64."""
    return t.float().double()


# ---------------------------------------------------------------------------------------------
# float64 references


def quantize_per_token_float64(x, bits, is_masked=None, gate_masked=None, gate_unmasked=None):
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x = x.double()
    if gate_masked is not None:
        x = f32(x * torch.where(is_masked.reshape(*x.shape[:-1], 1), gate_masked.double(), gate_unmasked.double()))
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = f32(f32(hi - lo) / (2**bits - 1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = qmin - torch.floor(f32(f32(lo / scale) + 0.5))
    q = (torch.floor(f32(f32(x / scale) + 0.5)) + zero).clamp(qmin, qmax)
    return q, scale, zero


def quantized_linear_float64(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, out_dtype):
    k = xq.shape[-1]
    acc = xq.reshape(-1, k).double() @ wq.double().t() - x_zero.reshape(-1, 1).double() * w_sum.double()
    y = f32(f32(f32(acc) * x_scale.reshape(-1, 1).double()) * w_scale.double())
    if bias is not None:
        y = f32(y + bias.float().double())
    return y.float().to(out_dtype).reshape(*xq.shape[:-1], wq.shape[0])


def quantize_weight_float64(w, bits):
    qmax = (1 << (bits - 1)) - 1
    w = w.float().double()
    scale = f32(w.abs().amax(1) / qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.floor(f32(f32(w / scale[:, None]) + 0.5)).clamp(-qmax, qmax)
    return q, scale, q.sum(1)


# ---------------------------------------------------------------------------------------------
# the property checks


def _mismatch(name: str, got: torch.Tensor, want: torch.Tensor) -> list[str]:
    if got.shape != want.shape:
        return [f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"]
    if torch.equal(got.double(), want.double()):
        return []
    bad = (got.double() != want.double()).sum().item()
    return [f"{name}: {bad} of {want.numel()} values differ from the float64 reference"]


def quantize_per_token_problems(x, bits, is_masked=None, gate_masked=None, gate_unmasked=None, op=torch.ops.stq.quantize_per_token) -> list[str]:
    q, scale, zero = op(x, bits, is_masked, gate_masked, gate_unmasked)
    problems = [
        f"{what} has dtype {t.dtype}, not {dtype}"
        for what, t, dtype in (("codes", q, torch.int8), ("scale", scale, torch.float32), ("zero", zero, torch.int32))
        if t.dtype != dtype
    ]
    ref_q, ref_scale, ref_zero = quantize_per_token_float64(x, bits, is_masked, gate_masked, gate_unmasked)
    return problems + _mismatch("scale", scale, ref_scale) + _mismatch("zero point", zero, ref_zero) + _mismatch("codes", q, ref_q)


def quantized_linear_problems(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, out_dtype, op=torch.ops.stq.quantized_linear) -> list[str]:
    y = op(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, out_dtype)
    ref = quantized_linear_float64(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, out_dtype)
    problems = [] if y.dtype == out_dtype else [f"output dtype {y.dtype}, not {out_dtype}"]
    return problems + _mismatch("output", y, ref)


def quantize_weight_problems(w, bits, fn=quantize_weight) -> list[str]:
    qw = fn(w, bits)
    ref_q, ref_scale, ref_sum = quantize_weight_float64(w, bits)
    return _mismatch("weight scale", qw.scale, ref_scale) + _mismatch("weight codes", qw.q, ref_q) + _mismatch("weight sums", qw.w_sum, ref_sum)


def _within(name: str, got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> list[str]:
    if got.shape != ref.shape:
        return [f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"]
    err = (got.double() - ref).abs()
    over = err > bound
    if over.any():
        return [f"{name}: {over.sum().item()} values beyond the float32 error bound (worst excess {(err - bound).max().item():.3g})"]
    return []


def _rounding(dtype: torch.dtype) -> float:
    """Relative error of the final cast to ``dtype`` (of a float32 result)."""
    return {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]


def tac_problems(z, M, d, op=torch.ops.stq.tac_block_affine) -> list[str]:
    out = op(z, M, d)
    nb, g = M.shape[0], M.shape[1]
    zb = z.double().reshape(-1, nb, g)
    ref = (torch.einsum("tbj,bij->tbi", zb, M.double()) + d.double().reshape(nb, g)).reshape(z.shape)
    magnitude = (torch.einsum("tbj,bij->tbi", zb.abs(), M.double().abs()) + d.double().abs().reshape(nb, g)).reshape(z.shape)
    unit = 2.0**-53 if z.dtype == torch.float64 else U32
    bound = 2 * (g + 1) * unit * magnitude + _rounding(z.dtype) * ref.abs()
    problems = [] if out.dtype == z.dtype else [f"TAC output dtype {out.dtype}, not {z.dtype}"]
    problems += _within("TAC map", out, ref, bound)
    identity = torch.equal(M, torch.eye(g, dtype=M.dtype).expand_as(M)) and not d.any()
    if identity and not torch.equal(out, z):
        problems.append("TAC map with M = I, d = 0 changed its input")
    return problems


def kron_problems(x, p1, p2, op=torch.ops.stq.kron_transform) -> list[str]:
    out = op(x, p1, p2)
    p = torch.kron(p1.double(), p2.double())
    ref = x.double() @ p
    magnitude = x.double().abs() @ p.abs()
    bound = 2 * (p1.shape[0] + p2.shape[0]) * U32 * magnitude
    return _within("Kronecker transform", out, ref, bound)


# ---------------------------------------------------------------------------------------------
# random inputs


@st.composite
def activations(draw, dtypes=(torch.float32, torch.bfloat16, torch.float16), min_features=1):
    """A random activation [..., K] with per-token magnitudes, outlier channels and degenerate tokens."""
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))) or (draw(st.integers(1, 6)),)
    k = draw(st.integers(min_features, 72))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    low, high = (-5, 2) if dtype == torch.float16 else (-38, 30)  # finite: NaN/inf codes are unspecified
    exponent = draw(st.integers(low, high))
    x = torch.randn(*lead, k, generator=gen) * torch.rand(*lead, 1, generator=gen) * 10.0**exponent
    if draw(st.booleans()) and k > 1:
        x[..., torch.randint(0, k, (1,), generator=gen)] *= 50.0  # an outlier channel
    rows = x.reshape(-1, k)
    for special in draw(st.lists(st.sampled_from(["zero", "constant", "positive", "negative", "one_hot"]), max_size=3)):
        r = torch.randint(0, rows.shape[0], (1,), generator=gen).item()
        if special == "zero":
            rows[r] = 0
        elif special == "constant":
            rows[r] = rows[r, 0]
        elif special == "positive":
            rows[r] = rows[r].abs()
        elif special == "negative":
            rows[r] = -rows[r].abs()
        else:
            rows[r] = 0
            rows[r, torch.randint(0, k, (1,), generator=gen)] = 10.0**exponent
    x = x.to(dtype)
    assert torch.isfinite(x).all()
    return x


@st.composite
def state_gates(draw, x):
    """(is_masked, gate_masked, gate_unmasked): 0/1 SGAT gates, or arbitrary per-column scales."""
    k = x.shape[-1]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    is_masked = torch.rand(x.shape[:-1], generator=gen) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    if draw(st.booleans()):
        return is_masked, (torch.rand(k, generator=gen) > 0.2).float(), (torch.rand(k, generator=gen) > 0.2).float()
    return is_masked, torch.rand(k, generator=gen) * 2, torch.rand(k, generator=gen) * 2


# ---------------------------------------------------------------------------------------------
# the properties


@examples(10)
@given(data=st.data(), bits=st.sampled_from([4, 8]), gated=st.booleans())
def test_quantize_per_token_matches_float64(data, bits, gated):
    x = data.draw(activations())
    gates = data.draw(state_gates(x)) if gated else ()
    assert quantize_per_token_problems(x, bits, *gates) == []


@examples(10)
@given(
    data=st.data(),
    a_bits=st.sampled_from([4, 8]),
    w_bits=st.sampled_from([4, 8]),
    n=st.integers(1, 40),
    bias=st.sampled_from([None, torch.float32, torch.bfloat16]),
    out_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    seed=st.integers(0, 2**31),
)
def test_quantized_linear_matches_float64(data, a_bits, w_bits, n, bias, out_dtype, seed):
    # K >= 2: one input feature is a known bug, pinned by test_a_linear_with_one_input_feature
    x = data.draw(activations(dtypes=(torch.float32,), min_features=2))
    gen = torch.Generator().manual_seed(seed)
    k = x.shape[-1]
    xq, xs, xz = torch.ops.stq.quantize_per_token(x, a_bits)
    qmax = (1 << (w_bits - 1)) - 1
    wq = torch.randint(-qmax, qmax + 1, (n, k), generator=gen, dtype=torch.int8)
    ws = torch.rand(n, generator=gen) * 10.0 ** torch.randint(-6, 3, (n,), generator=gen).float()
    b = None if bias is None else torch.randn(n, generator=gen).to(bias)
    problems = quantized_linear_problems(xq, xs, xz, wq, ws, wq.sum(1, dtype=torch.int32), b, out_dtype)
    assert problems == []


@examples(10)
@given(
    n=st.integers(1, 24),
    k=st.integers(1, 80),
    bits=st.sampled_from([4, 8]),
    exponent=st.integers(-30, 30),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    zero_rows=st.integers(0, 2),
    seed=st.integers(0, 2**31),
)
def test_quantize_weight_matches_float64(n, k, bits, exponent, dtype, zero_rows, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 10.0**exponent
    w[:zero_rows] = 0
    assert quantize_weight_problems(w.to(dtype), bits) == []


@examples(10)
@given(
    tokens=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    blocks=st.integers(1, 6),
    g=st.sampled_from([1, 2, 3, 4, 8, 16]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    identity=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_tac_block_affine_matches_float64(tokens, blocks, g, dtype, identity, seed):
    gen = torch.Generator().manual_seed(seed)
    c = blocks * g
    z = (torch.randn(*tokens, c, generator=gen) * 3).to(dtype)
    if identity:
        M, d = torch.eye(g).expand(blocks, g, g).clone(), torch.zeros(c)
    else:
        M, d = torch.eye(g) + 0.5 * torch.randn(blocks, g, g, generator=gen), torch.randn(c, generator=gen)
    assert tac_problems(z, M, d) == []


@examples(10)
@given(
    tokens=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    d1=st.integers(1, 9),
    d2=st.integers(1, 9),
    seed=st.integers(0, 2**31),
)
def test_kron_transform_matches_float64(tokens, d1, d2, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, d1 * d2, generator=gen) * 10
    assert kron_problems(x, torch.randn(d1, d1, generator=gen), torch.randn(d2, d2, generator=gen)) == []


def test_a_linear_with_one_input_feature():
    """On CPU torch._int_mm misreads a transposed [N, 1] weight (strides (1, 1)); the op reshapes."""
    xq, xs, xz = torch.ops.stq.quantize_per_token(torch.randn(3, 1), 8)
    wq = torch.randint(-127, 128, (5, 1), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert quantized_linear_problems(xq, xs, xz, wq, torch.rand(5), wq.sum(1, dtype=torch.int32), None, torch.float32) == []


# ---------------------------------------------------------------------------------------------
# each check catches a broken op


def _broken_quantizer(levels=lambda bits: 2**bits - 1, rounding=lambda v: torch.floor(v + 0.5), round_zero=True, swap_gates=False):
    """The reference op with one step changed."""

    def op(x, bits, is_masked=None, gate_masked=None, gate_unmasked=None):
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        xf = x.float()
        if gate_masked is not None:
            if swap_gates:
                gate_masked, gate_unmasked = gate_unmasked, gate_masked
            xf = xf * torch.where(is_masked.reshape(*x.shape[:-1], 1), gate_masked, gate_unmasked)
        lo = xf.amin(-1, keepdim=True).clamp(max=0)
        hi = xf.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / torch.full_like(hi, float(levels(bits)))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = qmin - (rounding(lo / scale) if round_zero else lo / scale)
        q = torch.clamp(rounding(xf / scale) + zero, qmin, qmax)
        return q.to(torch.int8), scale, zero.to(torch.int32)

    return op


X = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(0))


def test_the_reference_quantizer_itself_passes():
    assert quantize_per_token_problems(X, 4, op=_broken_quantizer()) == []


def test_a_quantizer_with_2_to_the_b_levels_is_caught():
    assert quantize_per_token_problems(X, 4, op=_broken_quantizer(levels=lambda bits: 2**bits))


def test_a_quantizer_with_an_unrounded_zero_point_is_caught():
    assert quantize_per_token_problems(X, 8, op=_broken_quantizer(round_zero=False))


def test_a_quantizer_that_rounds_ties_to_even_is_caught():
    tie = torch.tensor([[0.0, 2.5, 15.0]])  # 4 bits: scale 1, and 2.5 is a tie
    assert quantize_per_token_problems(tie, 4, op=_broken_quantizer()) == []
    assert _has(quantize_per_token_problems(tie, 4, op=_broken_quantizer(rounding=torch.round)), "codes: 1 of 3 values differ")


def test_a_quantizer_with_swapped_gates_is_caught():
    is_masked = torch.tensor([True, False, True, False, True]).expand(3, 5)
    gm, gu = (torch.arange(24) % 3 != 0).float(), (torch.arange(24) % 3 != 1).float()
    assert quantize_per_token_problems(X, 4, is_masked, gm, gu, op=_broken_quantizer(swap_gates=True))


def _linear_inputs():
    gen = torch.Generator().manual_seed(1)
    xq, xs, xz = torch.ops.stq.quantize_per_token(torch.randn(6, 32, generator=gen), 4)
    wq = torch.randint(-7, 8, (10, 32), generator=gen, dtype=torch.int8)
    return xq, xs, xz, wq, torch.rand(10, generator=gen), wq.sum(1, dtype=torch.int32), torch.randn(10, generator=gen)


def test_a_linear_without_the_zero_point_correction_is_caught():
    def no_correction(xq, xs, xz, wq, ws, wsum, bias, out_dtype):
        return torch.ops.stq.quantized_linear(xq, xs, torch.zeros_like(xz), wq, ws, wsum, bias, out_dtype)

    assert quantized_linear_problems(*_linear_inputs(), torch.float32, op=no_correction)


def test_a_linear_that_multiplies_the_scales_first_is_caught():
    def scales_first(xq, xs, xz, wq, ws, wsum, bias, out_dtype):
        acc = torch._int_mm(xq, wq.t()) - xz.reshape(-1, 1) * wsum.reshape(1, -1)
        return (acc.float() * (xs.reshape(-1, 1) * ws.reshape(1, -1)) + bias).to(out_dtype)

    # one float32 rounding in a different place: some outputs move by an ulp, and exactness sees it
    assert _has(quantized_linear_problems(*_linear_inputs(), torch.float32, op=scales_first), "output:")


def test_a_weight_quantizer_that_never_reaches_qmax_is_caught():
    def short_range(w, bits):
        qmax = (1 << (bits - 1)) - 1
        scale = w.float().abs().amax(1) / (qmax + 1)
        q = torch.clamp(torch.floor(w.float() / scale[:, None] + 0.5), -qmax, qmax).to(torch.int8)
        return type(quantize_weight(w, bits))(q, scale, q.sum(1, dtype=torch.int32), bits)

    assert quantize_weight_problems(torch.randn(8, 16), 4, fn=short_range)


def test_a_tac_map_with_M_untransposed_is_caught():
    def untransposed(z, M, d):
        return torch.ops.stq.tac_block_affine(z, M.transpose(1, 2).contiguous(), d)

    M = torch.eye(4) + torch.randn(3, 4, 4)
    assert tac_problems(torch.randn(5, 12), M, torch.randn(12), op=untransposed)


def test_a_tac_map_that_perturbs_the_identity_is_caught():
    def leaky(z, M, d):
        return torch.ops.stq.tac_block_affine(z, M, d + 2.0**-20)

    assert _has(tac_problems(torch.randn(5, 12), torch.eye(4).expand(3, 4, 4).clone(), torch.zeros(12), op=leaky), "M = I, d = 0 changed")


def test_a_kronecker_transform_with_P1_untransposed_is_caught():
    def untransposed(x, p1, p2):
        return torch.ops.stq.kron_transform(x, p1.t().contiguous(), p2)

    assert kron_problems(torch.randn(4, 12), torch.randn(3, 3), torch.randn(4, 4), op=untransposed)


def _has(problems: list[str], fragment: str) -> bool:
    return any(fragment in p for p in problems)
