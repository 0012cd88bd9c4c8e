"""Triton kernels for the round-to-nearest ops ``stq::quantize_per_token`` and ``stq::quantized_linear``.

Plain (not yet fused or Hopper-specialised) kernels whose results equal the reference
implementations in ``stq_compiler.ops`` bit for bit:

* ``quantize_per_token_triton``: one program per ``BLOCK_M`` token rows; a first pass over K
  finds ``min``/``max``, a second pass quantizes. Divisions are IEEE float32 (``tl.math.div_rn``;
  Triton's ``/`` on float32 is an approximate division on NVIDIA GPUs) and rounding is
  ``floor(v + 0.5)``, as in the reference.
* ``quantized_linear_triton``: a tiled GEMM of int8 codes with ``tl.dot`` accumulating in int32
  (exact), then the zero-point correction in int32 and the scale/bias epilogue in float32.

Both kernels are compiled with ``enable_fp_fusion=False`` so that no multiply is contracted with
a following add into an FMA (that would round once instead of twice and could differ from the
reference in the last bit). The only float work of the GEMM is its epilogue, so this is cheap.

Under ``TRITON_INTERPRET=1`` (read when this module is imported) the kernels run on CPU tensors
with one large-block configuration and no autotuning, which is how they are tested without a GPU.
``register_cuda_kernels()`` makes the ``stq::`` ops use these kernels for CUDA tensors.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import textwrap
from typing import Optional

import torch
import triton
import triton.language as tl

from stq_compiler.codegen.dispatch import register_cuda

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Host-side twins of ``triton.cdiv`` and ``triton.next_power_of_2``: in Triton 3.7 those are
# constexpr functions, whose call from Python costs a few microseconds (argument unwrapping), and
# the launch paths call them several times per op (without CUDA graphs that is host time per step).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0

# Float dtypes the kernels load directly; any other float dtype is converted to float32 first
# (exact for narrower formats, and the reference does the same with ``x.float()``).
_LOADABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ----------------------------------------------------------------------------------------------
# Per-token asymmetric quantization


@triton.jit
def _load_gated_rows(
    x_ptr, row_offsets, row_ok, masked, gate_m_ptr, gate_u_ptr, cols, K, HAS_GATE: tl.constexpr
):
    """A [BLOCK_M, BLOCK_K] tile of x in float32, times the state gate; 0 outside the matrix."""
    col_ok = cols < K
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + row_offsets[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_GATE:
        g_m = tl.load(gate_m_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        g_u = tl.load(gate_u_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        x = x * tl.where(masked[:, None], g_m[None, :], g_u[None, :])
    return x


@triton.jit
def _quantize_per_token_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr,
    is_masked_ptr, gate_m_ptr, gate_u_ptr,
    M, K, stride_xm, stride_qm,
    QMIN: tl.constexpr, QMAX: tl.constexpr, LEVELS: tl.constexpr,
    HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = rows.to(tl.int64) * stride_xm
    q_rows = rows.to(tl.int64) * stride_qm
    cols0 = tl.arange(0, BLOCK_K)
    if HAS_GATE:
        masked = tl.load(is_masked_ptr + rows, mask=row_ok, other=0) != 0
    else:
        masked = row_ok  # unused

    # Pass 1: lo = min(min(x), 0), hi = max(max(x), 0). Padding loads as 0, which cannot move them.
    # Element-wise running min/max and one reduction after the loop (a reduction inside the loop
    # also crashes Triton's OptimizeThreadLocality pass for float32 [1, BLOCK_K] tiles).
    lo_tile = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    hi_tile = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _load_gated_rows(x_ptr, x_rows, row_ok, masked, gate_m_ptr, gate_u_ptr, k0 + cols0, K, HAS_GATE)
        lo_tile = tl.minimum(lo_tile, x)
        hi_tile = tl.maximum(hi_tile, x)
    lo = tl.min(lo_tile, axis=1)
    hi = tl.max(hi_tile, axis=1)

    # div_rn wants operands of one shape: broadcast the constants explicitly.
    scale = tl.math.div_rn(hi - lo, tl.full([BLOCK_M], LEVELS, tl.float32))
    scale = tl.where(scale > 0, scale, 1.0)
    zero = QMIN - tl.floor(tl.math.div_rn(lo, scale) + 0.5)
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    tl.store(zero_ptr + rows, zero.to(tl.int32), mask=row_ok)

    # Pass 2: q = clamp(floor(x / scale + 0.5) + zero, QMIN, QMAX).
    scale_tile = tl.broadcast_to(scale[:, None], (BLOCK_M, BLOCK_K))
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols0
        x = _load_gated_rows(x_ptr, x_rows, row_ok, masked, gate_m_ptr, gate_u_ptr, cols, K, HAS_GATE)
        q = tl.floor(tl.math.div_rn(x, scale_tile) + 0.5) + zero[:, None]
        q = tl.minimum(tl.maximum(q, QMIN), QMAX)
        ok = row_ok[:, None] & (cols < K)[None, :]
        tl.store(q_ptr + q_rows[:, None] + cols[None, :], q.to(tl.int32).to(tl.int8), mask=ok)


def _quantize_blocks(m: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps): about 4K elements a tile on the GPU, 16K in the interpreter."""
    block_k = min(next_power_of_2(k), 16384 if INTERPRET else 4096)
    tile = 16384 if INTERPRET else 4096
    block_m = max(1, min(next_power_of_2(m), tile // block_k))
    num_warps = 8 if block_m * block_k >= 4096 else 4
    return block_m, block_k, num_warps


def quantize_per_token_triton(
    x: torch.Tensor,
    bits: int,
    is_masked: Optional[torch.Tensor] = None,
    gate_masked: Optional[torch.Tensor] = None,
    gate_unmasked: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``stq::quantize_per_token`` in Triton: (codes int8 like x, scale float32 [...,1], zero int32 [...,1])."""
    ops = _ops()
    ops._check_quantize_args(x, bits, is_masked, gate_masked, gate_unmasked)
    qmin, qmax = ops.act_qrange(bits)
    lead, k = x.shape[:-1], x.shape[-1]
    if x.dtype not in _LOADABLE_DTYPES:
        x = x.float()
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    zero = torch.empty((m,), dtype=torch.int32, device=x.device)
    if m > 0:
        has_gate = gate_masked is not None
        if has_gate:
            state = is_masked.reshape(-1)
            state = state.view(torch.uint8) if state.dtype == torch.bool else (state != 0).view(torch.uint8)
            state = state.contiguous()
            gate_m, gate_u = gate_masked.contiguous(), gate_unmasked.contiguous()
        else:
            state, gate_m, gate_u = scale, scale, scale  # never read
        block_m, block_k, num_warps = _quantize_blocks(m, k)
        with _device_of(x2):
            _quantize_per_token_kernel[(cdiv(m, block_m),)](
                x2, q, scale, zero, state, gate_m, gate_u,
                m, k, x2.stride(0), q.stride(0),
                QMIN=qmin, QMAX=qmax, LEVELS=float((1 << bits) - 1),
                HAS_GATE=has_gate, BLOCK_M=block_m, BLOCK_K=block_k,
                num_warps=num_warps, enable_fp_fusion=False,
            )
    return q.view(*lead, k), scale.view(*lead, 1), zero.view(*lead, 1)


# ----------------------------------------------------------------------------------------------
# The int8 GEMM with zero-point correction and scale/bias epilogue


@triton.jit
def _bfloat16_bits_rne(y):
    """float32 -> bfloat16 bit pattern (int16), rounding to nearest even as torch does.

    Only used under the interpreter, whose float32 -> bfloat16 cast truncates; on the GPU the
    native cast (cvt.rn.bf16.f32) already rounds to nearest even.
    """
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    bits = tl.where(y != y, 0x7FC0, bits)  # NaN stays a quiet NaN
    return bits.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def grouped_tile(pid, num_major, num_minor, GROUP: tl.constexpr):
    """(major, minor) tile of program ``pid`` in grouped launch order: ``GROUP`` consecutive major
    tiles share each minor tile (a tile of W, for the GEMMs here) while it is in L2."""
    pids_per_group = GROUP * num_minor
    first = (pid // pids_per_group) * GROUP
    group = min(num_major - first, GROUP)
    return first + (pid % pids_per_group) % group, (pid % pids_per_group) // group


@triton.jit
def _quantized_linear_kernel_body(
    a_ptr, b_ptr, x_scale_ptr, x_zero_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BF16_BITS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge re-read valid ones (wrapped) and are masked at the store.
    a_rows = (offs_m % M).to(tl.int64)
    b_rows = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + b_rows[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    m_ok = offs_m < M
    n_ok = offs_n < N
    x_zero = tl.load(x_zero_ptr + offs_m, mask=m_ok, other=0)
    w_sum = tl.load(w_sum_ptr + offs_n, mask=n_ok, other=0)
    acc = acc - x_zero[:, None] * w_sum[None, :]
    x_scale = tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]  # (acc * x_scale) * w_scale
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if BF16_BITS:
        y = _bfloat16_bits_rne(y)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_EVEN_K = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})

# Under the interpreter: one configuration with large blocks (few programs, fast on CPU).
_INTERPRET_GEMM_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}


def _gemm_config(block_m, block_n, block_k, num_warps, num_stages, group=8, group_key="GROUP_M"):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, group_key: group},
        num_warps=num_warps, num_stages=num_stages,
    )


# A few shapes for Hopper; int8 tiles are half the bytes of fp16 ones, so BLOCK_K is 128-256.
_GPU_GEMM_CONFIGS = [
    _gemm_config(128, 256, 128, 8, 3),
    _gemm_config(256, 128, 128, 8, 3),
    _gemm_config(128, 128, 128, 8, 4),
    _gemm_config(128, 128, 64, 4, 4),
    _gemm_config(64, 256, 128, 8, 3),
    _gemm_config(64, 128, 128, 4, 4),
    # a few tokens (decoding-like M): narrow row tiles, deep K steps
    _gemm_config(16, 64, 256, 4, 4),
    _gemm_config(16, 128, 128, 4, 4),
    _gemm_config(32, 64, 256, 4, 4),
    _gemm_config(32, 128, 128, 4, 4),
]


def row_tiles_fitting(configs, m: int):
    """The configurations whose row (token) tile fits M: up to the next power of two for few
    tokens, >= 64 for many."""
    if m > 64:
        return [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
    cap = max(16, next_power_of_2(m))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= cap]


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Tune only row tiles that fit M."""
    return row_tiles_fitting(configs, named_args["M"])


if INTERPRET:
    _quantized_linear_kernel = _EVEN_K(_quantized_linear_kernel_body)
else:
    _quantized_linear_kernel = triton.autotune(
        configs=_GPU_GEMM_CONFIGS,
        key=["M", "N", "K"],
        prune_configs_by={"early_config_prune": _prune_gemm_configs},
    )(_EVEN_K(_quantized_linear_kernel_body))


def quantized_linear_triton(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``stq::quantized_linear`` in Triton: ``(xq @ wqᵀ - x_zero * w_sum) * x_scale * w_scale + bias``."""
    _ops()._check_linear_args(xq, x_scale, x_zero, wq, w_scale, w_sum, bias)
    lead, k = xq.shape[:-1], xq.shape[-1]
    n = wq.shape[0]
    a = xq.reshape(-1, k)
    m = a.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    bf16_bits = INTERPRET and out_dtype == torch.bfloat16
    if m > 0 and n > 0:
        x_scale, x_zero = x_scale.reshape(-1).contiguous(), x_zero.reshape(-1).contiguous()
        w_scale, w_sum = w_scale.contiguous(), w_sum.contiguous()
        bias_arg = bias.contiguous() if bias is not None else w_scale  # never read without bias
        args = (
            a, wq, x_scale, x_zero, w_scale, w_sum, bias_arg, y,
            m, n, k,
            a.stride(0), a.stride(1), wq.stride(0), wq.stride(1), y.stride(0), y.stride(1),
        )
        if bf16_bits:
            args = (*args[:7], y.view(torch.int16), *args[8:])

        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)

        with _device_of(a):
            if INTERPRET:
                _quantized_linear_kernel[grid](
                    *args, HAS_BIAS=bias is not None, BF16_BITS=bf16_bits, **_INTERPRET_GEMM_CONFIG
                )
            else:
                _quantized_linear_kernel[grid](
                    *args, HAS_BIAS=bias is not None, BF16_BITS=False, enable_fp_fusion=False
                )
    return y.view(*lead, n)


# ----------------------------------------------------------------------------------------------
# Registration and inspection


def _ops():
    # Imported lazily: stq_compiler.ops imports this module at its end to register the kernels.
    return importlib.import_module("stq_compiler.ops")


def _device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: the context that makes it ``t``'s (none
    needed, and none entered, when it already is)."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


_registered = False


def register_cuda_kernels() -> None:
    """Make ``stq::quantize_per_token`` and ``stq::quantized_linear`` run these kernels on CUDA
    (registered with the dispatcher directly: ``dispatch.register_cuda``)."""
    global _registered
    if _registered:
        return
    ops = _ops()
    register_cuda(ops.quantize_per_token, _quantize_per_token_cuda)
    register_cuda(ops.quantized_linear, _quantized_linear_cuda)
    _registered = True


# Thin wrappers so the launchers are looked up at call time (tests can wrap them to count calls).
def _quantize_per_token_cuda(x, bits, is_masked=None, gate_masked=None, gate_unmasked=None):
    return quantize_per_token_triton(x, bits, is_masked, gate_masked, gate_unmasked)


def _quantized_linear_cuda(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, out_dtype):
    return quantized_linear_triton(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, out_dtype)


def kernel_sources() -> dict[str, str]:
    """The Triton source of each kernel, by name (for inspection and dumps)."""
    kernels = (_load_gated_rows, _quantize_per_token_kernel, _bfloat16_bits_rne, _quantized_linear_kernel_body)
    sources = {}
    for kernel in kernels:
        fn = kernel
        while hasattr(fn, "fn"):  # Autotuner / Heuristics / JITFunction / InterpretedFunction
            fn = fn.fn
        sources[fn.__name__] = textwrap.dedent(inspect.getsource(fn))
    return sources
