"""The Triton RTN kernels against the reference ops on CUDA, at the models' real shapes.

Run on a GPU machine: ``pytest -m cuda tests/codegen/test_triton_rtn_cuda.py -s``; every case prints
one line (``[stq-cuda] op case ... max_abs_diff=... PASS``) for the results record.

The reference runs on CPU copies of the inputs: it is the definition. (On CUDA, torch computes
``tensor / python_float`` as a multiply by the reciprocal, so the reference's
``(hi - lo) / (2**b - 1)`` run on CUDA tensors is not the IEEE division the semantics specify.)
Shapes: LLaDA-8B (hidden 4096, MLP 12288, MHA), Dream-7B (hidden 3584, MLP 18944, GQA k/v 512,
qkv bias), and awkward ones (1 and 17 tokens, K = 4000).
"""

from __future__ import annotations

import os

import pytest
import torch

from stq_compiler import ops
from stq_compiler.codegen import triton_rtn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") == "1", reason="TRITON_INTERPRET=1: kernels would be interpreted"
    ),
]

DEV = "cuda"


def report(op, case, max_abs_diff, ok, extra=""):
    print(f"[stq-cuda] {op:<9} {case:<40} max_abs_diff={max_abs_diff:.3e} {extra} {'PASS' if ok else 'FAIL'}")


def _activation(m, k, dtype, seed):
    """Normal tokens with a few outlier channels (as in LLM activations), one all-zero token."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, k, device=DEV, generator=gen)
    channels = torch.randint(0, k, (8,), device=DEV, generator=gen)
    x[:, channels] *= 50.0
    if m > 2:
        x[1] = 0.0
        x[2] = x[2].abs()
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------
# quantize_per_token

QUANT_K = {"llada-hidden": 4096, "llada-mlp": 12288, "dream-hidden": 3584, "dream-mlp": 18944, "odd": 4000}
QUANT_CASES = [(name, m, k) for name, k in QUANT_K.items() for m in (1, 17, 1024)]


def _check_quantize(case, x, bits, state=(None, None, None)):
    q, scale, zero = triton_rtn.quantize_per_token_triton(x, bits, *state)
    torch.cuda.synchronize()
    cpu_state = tuple(t.cpu() if t is not None else None for t in state)
    q_ref, scale_ref, zero_ref = ops.quantize_per_token_reference(x.cpu(), bits, *cpu_state)
    q, scale, zero = q.cpu(), scale.cpu(), zero.cpu()
    bad_q = int((q != q_ref).sum())
    bad_scale = int((scale != scale_ref).sum())
    bad_zero = int((zero != zero_ref).sum())
    max_diff = (q.int() - q_ref.int()).abs().max().item()
    ok = bad_q == bad_scale == bad_zero == 0
    report("quantize", case, max_diff, ok, f"q_mismatch={bad_q} scale_mismatch={bad_scale} zero_mismatch={bad_zero}")
    assert ok


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name,m,k", QUANT_CASES, ids=[f"{n}-M{m}-K{k}" for n, m, k in QUANT_CASES])
def test_quantize_real_shapes(name, m, k, bits, gated):
    x = _activation(m, k, torch.bfloat16, seed=m * 100003 + k + bits)
    state = (None, None, None)
    if gated:
        gen = torch.Generator(device=DEV).manual_seed(k + m)
        state = (
            torch.rand(m, device=DEV, generator=gen) < 0.5,
            torch.randn(k, device=DEV, generator=gen).bfloat16(),
            (torch.rand(k, device=DEV, generator=gen) + 0.5).bfloat16(),
        )
    _check_quantize(f"{name} M={m} K={k} a{bits} bf16 {'gated' if gated else 'plain'}", x, bits, state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_quantize_other_input_dtypes(dtype):
    for bits in (4, 8):
        x = _activation(1024, 4096, dtype, seed=bits)
        _check_quantize(f"llada-hidden M=1024 K=4096 a{bits} {str(dtype)[6:]}", x, bits)


def test_quantize_many_tokens_and_leading_dims():
    # Many rows stress the per-token scale/zero divisions; a [batch, seq, hidden] input.
    x = _activation(262144, 32, torch.bfloat16, seed=7)
    _check_quantize("many-rows M=262144 K=32 a4", x, 4)
    x = _activation(2 * 512, 3584, torch.bfloat16, seed=8).reshape(2, 512, 3584)
    _check_quantize("dream [2,512,3584] a8", x, 8)


# ----------------------------------------------------------------------------------------------
# quantized_linear

# (name, K, N, has_bias): every linear shape of both models, plus an awkward one.
LINEAR_SHAPES = [
    ("llada-qkv/o", 4096, 4096, False),
    ("llada-gate/up", 4096, 12288, False),
    ("llada-down", 12288, 4096, False),
    ("dream-q/o", 3584, 3584, True),
    ("dream-k/v", 3584, 512, True),
    ("dream-gate/up", 3584, 18944, False),
    ("dream-down", 18944, 3584, False),
    ("odd", 4000, 4000, True),
]
LINEAR_CASES = [(name, m, k, n, b) for name, k, n, b in LINEAR_SHAPES for m in (1, 17, 1024)]
LINEAR_IDS = [f"{name}-M{m}-K{k}-N{n}" for name, m, k, n, _ in LINEAR_CASES]


def assert_epilogue_close(y, y_ref, acc, x_scale, w_scale, bias, out_dtype):
    """|y - y_ref| within 1e-6 of the terms' magnitude (plus one output ulp below float32).

    The kernel is launched with FMA contraction off and should be bit-exact, but a compiler that
    contracts ``(acc * x_scale) * w_scale + bias`` into one FMA rounds once instead of twice,
    which may change the last float32 bit, so we allow for it. Returns the max abs diff.
    """
    magnitude = (acc.double() * x_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)).abs()
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    rel = 1e-6 if out_dtype == torch.float32 else 1e-6 + torch.finfo(out_dtype).eps
    tol = rel * magnitude.reshape(y.shape) + torch.finfo(out_dtype).tiny
    diff = (y.double() - y_ref.double()).abs()
    return diff.max().item(), bool((diff <= tol).all()), int((y != y_ref).sum())


@pytest.mark.parametrize("name,m,k,n,has_bias", LINEAR_CASES, ids=LINEAR_IDS)
def test_linear_integer_part_is_exact(name, m, k, n, has_bias):
    gen = torch.Generator(device=DEV).manual_seed(m + k + n)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=DEV, generator=gen)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV, generator=gen)
    x_zero = torch.randint(-128, 128, (m, 1), dtype=torch.int32, device=DEV, generator=gen)
    w_sum = wq.sum(dim=1, dtype=torch.int32)
    ones_m, ones_n = torch.ones(m, 1, device=DEV), torch.ones(n, device=DEV)
    args = (xq, ones_m, x_zero, wq, ones_n, w_sum, None, torch.float32)
    y = triton_rtn.quantized_linear_triton(*args).cpu()
    y_ref = ops.quantized_linear_reference(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    # int32 -> float32 rounds to nearest even on both sides, so equality holds even above 2**24.
    ok = torch.equal(y, y_ref)
    report("linear", f"{name} M={m} K={k} N={n} int8 acc", (y - y_ref).abs().max().item(), ok,
           f"max|acc|={y_ref.abs().max().item():.3e}")
    assert ok


@pytest.mark.parametrize("name,m,k,n,has_bias", LINEAR_CASES, ids=LINEAR_IDS)
def test_linear_epilogue_real_scales(name, m, k, n, has_bias):
    # The W4A4 pipeline: activations quantized per token, weights per channel, bf16 output.
    x = _activation(m, k, torch.bfloat16, seed=m * 7 + k)
    gen = torch.Generator(device=DEV).manual_seed(n + k)
    w = ops.quantize_weight(torch.randn(n, k, device=DEV, generator=gen) * 0.02, bits=4)
    bias = (torch.randn(n, device=DEV, generator=gen) * 0.1).bfloat16() if has_bias else None
    _check_linear_epilogue(f"{name} M={m} K={k} N={n} w4a4", x, w, bias, torch.bfloat16)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("m", [17, 1024])
def test_linear_epilogue_other_out_dtypes(m, out_dtype):
    x = _activation(m, 3584, torch.float16, seed=m)
    gen = torch.Generator(device=DEV).manual_seed(m + 1)
    w = ops.quantize_weight(torch.randn(512, 3584, device=DEV, generator=gen) * 0.02, bits=8)
    bias = torch.randn(512, device=DEV, generator=gen).to(out_dtype)
    _check_linear_epilogue(f"dream-k/v M={m} w8a8 {str(out_dtype)[6:]}", x, w, bias, out_dtype, a_bits=8)


def _check_linear_epilogue(case, x, w, bias, out_dtype, a_bits=4):
    xq, x_scale, x_zero = triton_rtn.quantize_per_token_triton(x, a_bits)
    args = (xq, x_scale, x_zero, w.q, w.scale, w.w_sum, bias, out_dtype)
    y = triton_rtn.quantized_linear_triton(*args).cpu()
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    y_ref = ops.quantized_linear_reference(*cpu_args)
    acc = torch._int_mm(cpu_args[0], cpu_args[3].t()) - cpu_args[2] * cpu_args[5].reshape(1, -1)
    max_diff, ok, n_bits_differ = assert_epilogue_close(y, y_ref, acc, cpu_args[1], cpu_args[4], cpu_args[6], out_dtype)
    report("linear", case, max_diff, ok, f"{str(out_dtype)[6:]} differing={n_bits_differ}")
    assert ok


# ----------------------------------------------------------------------------------------------
# Dispatch: torch.ops.stq.* on CUDA tensors run these kernels


def test_ops_dispatch_to_triton_kernels(monkeypatch):
    triton_rtn.register_cuda_kernels()
    x = _activation(17, 4096, torch.bfloat16, seed=3)
    w = ops.quantize_weight(torch.randn(4096, 4096, device=DEV) * 0.02, bits=4)
    q_ref, s_ref, z_ref = ops.quantize_per_token_reference(x.cpu(), 4)
    y_ref = ops.quantized_linear_reference(q_ref, s_ref, z_ref, w.q.cpu(), w.scale.cpu(), w.w_sum.cpu(), None, torch.bfloat16)

    calls = {"quantize": 0, "linear": 0}
    launch_q, launch_l = triton_rtn.quantize_per_token_triton, triton_rtn.quantized_linear_triton

    def counting_quantize(*args):
        calls["quantize"] += 1
        return launch_q(*args)

    def counting_linear(*args):
        calls["linear"] += 1
        return launch_l(*args)

    def reference_must_not_run(*args, **kwargs):
        raise AssertionError("the CUDA path ran the reference implementation")

    monkeypatch.setattr(triton_rtn, "quantize_per_token_triton", counting_quantize)
    monkeypatch.setattr(triton_rtn, "quantized_linear_triton", counting_linear)
    monkeypatch.setattr(ops, "quantize_per_token_reference", reference_must_not_run)
    monkeypatch.setattr(ops, "quantized_linear_reference", reference_must_not_run)

    def quantized_layer(x):
        xq, x_scale, x_zero = torch.ops.stq.quantize_per_token(x, 4)
        return torch.ops.stq.quantized_linear(xq, x_scale, x_zero, w.q, w.scale, w.w_sum, None, torch.bfloat16)

    y = quantized_layer(x)
    assert calls == {"quantize": 1, "linear": 1}
    y_compiled = torch.compile(quantized_layer, fullgraph=True)(x)
    assert calls == {"quantize": 2, "linear": 2}
    torch.cuda.synchronize()
    ok = torch.equal(y.cpu(), y_ref) and torch.equal(y_compiled.cpu(), y_ref)
    report("dispatch", "torch.ops.stq.* eager+compile M=17 K=N=4096", (y.cpu().float() - y_ref.float()).abs().max().item(), ok)
    assert ok
