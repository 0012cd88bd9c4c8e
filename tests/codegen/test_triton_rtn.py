"""The Triton RTN kernels against the reference ops, on CPU under the Triton interpreter.

TRITON_INTERPRET is read when a kernel is *defined* (``@triton.jit``), i.e. when
``stq_compiler.codegen.triton_rtn`` is first imported, and it is process-wide: setting it from a
test module would depend on import order (another test file may already have imported the kernels
compiled for the GPU) and would leak into the files collected after this one (the CUDA tests would
then run interpreted). So this file runs itself in a fresh interpreter process:

* without ``TRITON_INTERPRET=1`` in the environment (a plain ``pytest tests``), it collects two
  tests: the module imports and registers cleanly without the interpreter, and one test that
  re-runs this file under ``pytest`` in a subprocess with ``TRITON_INTERPRET=1`` (its output is
  shown on failure);
* with ``TRITON_INTERPRET=1`` set from the start, it collects the kernel-vs-reference tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
REPO_ROOT = Path(__file__).resolve().parents[2]


if not INTERPRETING:

    def test_module_imports_and_registers_without_interpreter():
        from stq_compiler.codegen import triton_rtn

        assert not triton_rtn.INTERPRET
        triton_rtn.register_cuda_kernels()
        triton_rtn.register_cuda_kernels()  # idempotent
        sources = triton_rtn.kernel_sources()
        assert "tl.math.div_rn" in sources["_quantize_per_token_kernel"]
        assert "tl.dot" in sources["_quantized_linear_kernel_body"]

    def test_kernels_match_reference_in_triton_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-rs", "-p", "no:cacheprovider"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode == 5 or (proc.returncode == 0 and "passed" not in summary):
            # 5: nothing collected, i.e. the module skipped itself (see _interpreter_loops_to_runtime_bounds)
            pytest.skip(f"interpreter tests skipped themselves: {proc.stdout.strip()[-400:]}")
        assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr}"
        print(summary)

else:
    import triton
    import triton.language as tl

    from stq_compiler import ops
    from stq_compiler.codegen import triton_rtn
    from stq_compiler.codegen.triton_rtn import quantize_per_token_triton, quantized_linear_triton

    @triton.jit
    def _count_to(out_ptr, n):
        total = 0
        for _ in range(0, n, 1):
            total += 1
        tl.store(out_ptr, total)

    def _interpreter_loops_to_runtime_bounds() -> bool:
        # Triton 3.6's interpreter turns a loop bound into an int with int(1-element array),
        # which NumPy >= 2.5 refuses (Triton 3.7 squeezes first). The kernels loop over K.
        out = torch.zeros(1, dtype=torch.int32)
        try:
            _count_to[(1,)](out, 3)
        except Exception:
            return False
        return int(out) == 3

    if not _interpreter_loops_to_runtime_bounds():
        pytest.skip(
            f"Triton {triton.__version__}'s interpreter cannot loop to a runtime bound with this NumPy "
            "(int() of a 1-element array); use Triton >= 3.7 or NumPy < 2.5 for the interpreter tests",
            allow_module_level=True,
        )

    def test_kernels_are_interpreted():
        assert triton_rtn.INTERPRET

    # ------------------------------------------------------------------------------------------
    # quantize_per_token

    def _activation(shape, dtype, gen):
        """Normal values with a few large outliers, an all-zero token and one-signed tokens."""
        x = torch.randn(shape, generator=gen)
        flat = x.view(-1, shape[-1])
        k = shape[-1]
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=gen)
        flat.view(-1)[idx] *= 200.0
        m = flat.shape[0]
        if m >= 2:
            flat[1] = 0.0
        if m >= 3:
            flat[2] = flat[2].abs()
        if m >= 4:
            flat[3] = -flat[3].abs()
        if m >= 5:
            flat[4] = 0.0
            flat[4, k // 2] = -3.0  # a single nonzero
        return x.to(dtype)

    def _state(shape, gen):
        k = shape[-1]
        is_masked = torch.rand(shape[:-1], generator=gen) < 0.5
        gate_masked = torch.randn(k, generator=gen) * 2.0
        gate_unmasked = torch.rand(k, generator=gen) + 0.5
        return is_masked, gate_masked, gate_unmasked

    def _assert_quantize_equal(x, bits, state=(None, None, None)):
        q, scale, zero = quantize_per_token_triton(x, bits, *state)
        q_ref, scale_ref, zero_ref = ops.quantize_per_token_reference(x, bits, *state)
        assert q.dtype == torch.int8 and scale.dtype == torch.float32 and zero.dtype == torch.int32
        assert q.shape == x.shape and scale.shape == (*x.shape[:-1], 1) == zero.shape
        assert torch.equal(scale, scale_ref), (scale - scale_ref).abs().max()
        assert torch.equal(zero, zero_ref)
        assert torch.equal(q, q_ref), (q.int() - q_ref.int()).abs().max()

    @pytest.mark.parametrize("bits", [4, 8])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
    @pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
    @pytest.mark.parametrize("shape", [(1, 70), (7, 100), (3, 5, 33), (16, 256), (2, 1)])
    def test_quantize_matches_reference(shape, dtype, bits, gated):
        gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, bits, gated)).encode()))
        x = _activation(shape, dtype, gen)
        state = _state(shape, gen) if gated else (None, None, None)
        _assert_quantize_equal(x, bits, state)

    @pytest.mark.parametrize("bits", [4, 8])
    def test_quantize_loops_over_k_chunks(bits):
        # K above the interpreter's largest BLOCK_K: two chunks per pass, the second one partial.
        k = triton_rtn._quantize_blocks(3, 10**6)[1] + 617
        gen = torch.Generator().manual_seed(bits)
        x = _activation((3, k), torch.bfloat16, gen)
        _assert_quantize_equal(x, bits, _state((3, k), gen))

    def test_quantize_many_rows_per_program():
        # Small K: several tokens per program, the last program partly past M.
        gen = torch.Generator().manual_seed(1)
        x = _activation((1037, 24), torch.float16, gen)
        _assert_quantize_equal(x, 4)
        _assert_quantize_equal(x, 8, _state((1037, 24), gen))

    def test_quantize_noncontiguous_input_and_half_gates():
        gen = torch.Generator().manual_seed(2)
        x = _activation((40, 9), torch.float32, gen).t()  # [9, 40], not contiguous
        is_masked, g_m, g_u = _state((9, 40), gen)
        _assert_quantize_equal(x, 4, (is_masked, g_m.half(), g_u.bfloat16()))

    def test_quantize_rejects_what_the_op_rejects():
        x = torch.randn(2, 8)
        with pytest.raises(ValueError):
            quantize_per_token_triton(x, 3)
        with pytest.raises(ValueError):
            quantize_per_token_triton(x, 4, None, torch.ones(8), torch.ones(8))

    # ------------------------------------------------------------------------------------------
    # quantized_linear

    # The interpreter uses BLOCK_M=32, BLOCK_N=64, BLOCK_K=64: these cover partial tiles in every
    # dimension, several tiles in M and N, a K loop with a partial last step, and an even K.
    GEMM_SHAPES = [(1, 45, 70), (37, 100, 150), (5, 64, 128), (70, 130, 64), (33, 1, 200)]

    def _int8_operands(m, n, k, gen, bits=8):
        lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
        xq = torch.randint(lo, hi, (m, k), dtype=torch.int8, generator=gen)
        wq = torch.randint(lo + 1, hi, (n, k), dtype=torch.int8, generator=gen)
        x_zero = torch.randint(lo, hi, (m, 1), dtype=torch.int32, generator=gen)
        return xq, x_zero, wq, wq.sum(dim=1, dtype=torch.int32)

    def _integer_reference(xq, x_zero, wq, w_sum):
        return xq.long() @ wq.long().t() - x_zero.long() * w_sum.long()

    @pytest.mark.parametrize("bits", [4, 8])
    @pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_linear_integer_part_is_exact(mnk, bits):
        m, n, k = mnk
        gen = torch.Generator().manual_seed(m * 7919 + n * 31 + k + bits)
        xq, x_zero, wq, w_sum = _int8_operands(m, n, k, gen, bits)
        ones_m, ones_n = torch.ones(m, 1), torch.ones(n)
        y = quantized_linear_triton(xq, ones_m, x_zero, wq, ones_n, w_sum, None, torch.float32)
        exact = _integer_reference(xq, x_zero, wq, w_sum)
        assert exact.abs().max() < 2**24  # so the float32 output holds the integer exactly
        assert torch.equal(y, exact.float())
        assert torch.equal(y, ops.quantized_linear_reference(xq, ones_m, x_zero, wq, ones_n, w_sum, None, torch.float32))

    def assert_epilogue_close(y, y_ref, acc, x_scale, w_scale, bias, out_dtype):
        """|y - y_ref| within 1e-6 of the terms' magnitude (plus one output ulp below float32).

        The kernels are launched with FMA contraction off and are bit-exact in practice, but a
        backend that contracts ``(acc * x_scale) * w_scale + bias`` into one FMA rounds once
        instead of twice, which may change the last float32 bit, so we allow for it.
        """
        magnitude = (acc.double() * x_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)).abs()
        if bias is not None:
            magnitude = magnitude + bias.double().abs()
        rel = 1e-6 if out_dtype == torch.float32 else 1e-6 + torch.finfo(out_dtype).eps
        tol = rel * magnitude.reshape(y.shape) + torch.finfo(out_dtype).tiny
        diff = (y.double() - y_ref.double()).abs()
        assert y.dtype == y_ref.dtype == out_dtype and y.shape == y_ref.shape
        assert bool((diff <= tol).all()), f"max abs diff {diff.max().item():.3e}"

    @pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
    @pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_linear_epilogue_matches_reference(mnk, with_bias, out_dtype):
        m, n, k = mnk
        gen = torch.Generator().manual_seed(m * 7919 + n * 31 + k + with_bias)
        xq, x_zero, wq, w_sum = _int8_operands(m, n, k, gen)
        x_scale = torch.rand(m, 1, generator=gen) * 0.05 + 1e-3
        w_scale = torch.rand(n, generator=gen) * 0.01 + 1e-4
        bias = (torch.randn(n, generator=gen) * 4).to(out_dtype) if with_bias else None
        args = (xq, x_scale, x_zero, wq, w_scale, w_sum, bias, out_dtype)
        y = quantized_linear_triton(*args)
        y_ref = ops.quantized_linear_reference(*args)
        assert_epilogue_close(y, y_ref, _integer_reference(xq, x_zero, wq, w_sum), x_scale, w_scale, bias, out_dtype)

    def test_linear_after_quantize_with_leading_dims():
        # The two ops chained as a compiled graph would: activations [2, 3, K], weight from quantize_weight.
        gen = torch.Generator().manual_seed(3)
        x = _activation((2, 3, 96), torch.bfloat16, gen)
        w = ops.quantize_weight(torch.randn(80, 96, generator=gen), bits=4)
        bias = torch.randn(80, generator=gen).bfloat16()
        xq, x_scale, x_zero = quantize_per_token_triton(x, 4)
        y = quantized_linear_triton(xq, x_scale, x_zero, w.q, w.scale, w.w_sum, bias, torch.bfloat16)
        y_ref = ops.quantized_linear(*ops.quantize_per_token(x, 4), w.q, w.scale, w.w_sum, bias, torch.bfloat16)
        assert y.shape == (2, 3, 80)
        acc = _integer_reference(xq.reshape(-1, 96), x_zero.reshape(-1, 1), w.q, w.w_sum)
        assert_epilogue_close(y.reshape(6, 80), y_ref.reshape(6, 80), acc, x_scale, w.scale, bias, torch.bfloat16)

    def test_bfloat16_rounding_is_to_nearest_even():
        # The interpreter's own float32 -> bfloat16 cast truncates; the kernel must round like torch.
        vals = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, -(1.0 + 2**-8), 3.0e38, 1e-40])
        n = vals.numel()
        y = quantized_linear_triton(
            torch.ones(1, 1, dtype=torch.int8), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(n, 1, dtype=torch.int8), vals, torch.ones(n, dtype=torch.int32), None, torch.bfloat16,
        )
        assert torch.equal(y.view(torch.int16), vals.to(torch.bfloat16).reshape(1, n).view(torch.int16))


def test_host_cdiv_and_next_power_of_2_match_triton():
    # the launch paths' plain-Python twins of triton.cdiv / triton.next_power_of_2
    import triton

    from stq_compiler.codegen.triton_rtn import cdiv, next_power_of_2

    for n in range(0, 70000, 7):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 2, 3, 16, 64, 128, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d)
    for n in (2**k + e for k in range(1, 31) for e in (-1, 0, 1)):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
