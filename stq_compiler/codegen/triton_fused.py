"""Triton kernels for ``stq::fused_quantize`` and ``stq::fused_linear`` (``stq_compiler.fused_ops``).

``_fused_quantize_kernel``: one program per ``BLOCK_M`` tokens, the whole (padded) token in
registers as a ``[BLOCK_M, D1P, D2P]`` tile, feature ``i·d2 + j`` at ``[:, i, j]`` (the token's
``[d1, d2]`` matrix of the Kronecker transform; ``d1 = 1`` without one). The stages are
``tl.constexpr`` switches, so each ``FusedQuantizeSpec`` compiles to its own straight-line
kernel. Float work:

* RMSNorm: sum of squares over the tile, ``1 / sqrt_rn(ss / K + eps)``, times the norm weight;
* TAC (the o_proj site) runs first as its own kernel, ``_tac_affine_kernel`` (one [tokens, g] x
  [g, g] float32 dot per block of g channels, float32 out), and this kernel takes its output;
* Kronecker: ``X P2`` as one dot on the ``[BLOCK_M·D1P, D2P]`` view, then ``P1ᵀ (X P2)`` as a
  dot on the transposed view (``_token_kron_quantize_kernel``: one token a program, two plain 2-D
  dots; ``_token_kron_split_kernel`` (``SPLIT_TOKEN_ROWS``): the same with one side as two
  power-of-two blocks of at least ``MIN_SPLIT_BLOCK`` (Dream-7B's down site, 148 columns as
  128 + 64 instead of padded to 256; narrower blocks hit a Triton bug on Hopper), the columns'
  case computed transposed, ``P2ᵀ Xᵀ P1``). Each dot is ``_dot_f32`` with
  ``KRON_PRECISION = "bf16x3"``: both float32 operands split into bfloat16 hi + lo, three
  bfloat16 tensor-core products, float32 accumulation, about 1e-5 relative (plain TF32 would
  cost ~1e-3 and move 0.15 % of the codes; tf32x3, 1e-6, was 10-35 % slower; ``"ieee"`` lowers
  to unrolled FMAs that spill ~10 KB a thread at d = 4096 on sm_90a). The splits are rounded to
  nearest even by the GPU's conversion instruction and, in the interpreter, by integer arithmetic
  and multiplied in float32, so the interpreter runs the same arithmetic as the GPU;
* gate, min/max over the token (flattened: a reduction axis by axis cost a shuffle tree per row),
  ``floor(v / scale + 0.5)`` as in ``stq::quantize_per_token``: the division correctly rounded
  where no float stage precedes it (gate and quantize only: bit-exact), otherwise as a multiply
  by ``1 / scale`` (within 1.5 ulp, far below the float stages' error; a correctly rounded
  division costs ~20 instructions an element).

So the float parts differ from the reference by float32 summation order (the sum of squares,
TAC's dot) and bf16x3's dropped terms: about 1e-5 relative. On the H200 at 1024 tokens these
three choices (hardware rounding, flat min/max, reciprocal) took LLaDA-8B's q/k/v site from 35
to 17 µs and its down site from 164 to 95 (``benchmarks/results/explore-quantize-sites-h200.json``:
the SASS a token lost 58 % of its instructions; Nsight Compute showed the kernels issue-bound at
one or two programs a multiprocessor). Factors whose padded tile exceeds
``MAX_TOKEN_KRON_TILE`` and that the split kernel does not take (Dream-7B's MLP down site,
128 x 148, with ``SPLIT_TOKEN_ROWS`` off) run in ``_chunk_kron_quantize_kernel``: the second factor ``KRON_CHUNK`` columns at a time, the gated
values parked in a float32 scratch row per program until the token's min and max are known; with
a first factor above ``MAX_CHUNK_KRON_D1`` the float stages run as PyTorch ops before the kernel.
4-bit codes are packed (``fused_ops`` docstring) by splitting the tile's last axis into even/odd
pairs, so ``d2`` must be even (or ``d1 = 1``).

``_fused_linear_kernel``: the tiled int8 GEMM of ``triton_rtn`` generalised to packed operands.
With a packed operand it walks K by byte (``BLOCK_K // 2`` bytes, ``BLOCK_K`` codes) and runs
two int8 dots per step, even-k planes and odd-k planes (for W4A8, the int8 activation tile is
loaded whole and split into its even and odd columns in registers). Epilogue in float32: ``(acc·x_scale)·w_scale
+ bias``, then SwiGLU (two accumulators, the gate rows at n and the up rows at n + N/2) or a
residual add, one cast. Compiled with ``enable_fp_fusion=False`` like ``triton_rtn``.

``_w4_linear_kernel``: what ``fused_linear`` runs for a packed 4-bit weight and int8 activation
codes (W4A8, and W4A4 with the codes one a byte, as the fusion pass emits them). It computes
``Yᵀ = W Xᵀ``: the weight tile is unpacked in registers (``_nibble_planes``: on the GPU four bytes
a 32-bit register at once, see there) and given to ``tl.dot`` as the first operand, which
Hopper's wgmma reads from registers; the activation tile goes to shared memory untouched. With
the blocked weight the fusion pass emits (``BLOCKED``: ``fused_ops.pack_int4_blocks``) the two
nibble planes are the two K halves of a 128-code step, each dotted with its half of the
activation tile; with the pair layout (``pack_int4``) they are joined back into K order first.
With the weight second (``_fused_linear_kernel``) the unpacked tile has to be stored to shared
memory for wgmma, and that round trip halved the speed (H200: 780-815 TOP/s
here against 360-380 there, ``benchmarks/explore/w4_gemm_swapped.py``). The same epilogue, on the
transposed tile. On Hopper, where TMA can read the operands, ``_launch_w4`` runs its Gluon twin
instead (``gluon_w4.py``: the same bits, the MMA kept in flight while the next tile unpacks,
which Triton's pipeliner does not do with an int32 accumulator; about 1.3x faster).

Under ``TRITON_INTERPRET=1`` (read at import) both run on CPU tensors with one large-block
configuration; ``register_cuda_kernels()`` makes the ops use them on CUDA.
"""

from __future__ import annotations

import collections
import functools
import importlib
import inspect
import os
import textwrap
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl

from stq_compiler import tac_ops
from stq_compiler.codegen.dispatch import register_cuda
# the plain int8 GEMM's launch order, config builder and large-block interpreter configuration
from stq_compiler.codegen.triton_rtn import (
    _INTERPRET_GEMM_CONFIG, _device_of, _gemm_config, cdiv, grouped_tile, next_power_of_2, row_tiles_fitting,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRETING = tl.constexpr(INTERPRET)  # the same, readable inside kernels

_LOADABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _ops():
    return importlib.import_module("stq_compiler.fused_ops")


# ----------------------------------------------------------------------------------------------
# The activation side: [norm] -> [TAC] -> [smooth] -> [kron] -> [gate] -> quantize -> [pack]


@triton.jit
def _normalised(x, rstd, w, HAS_NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr):
    if HAS_NORM:
        x = x * rstd
        if HAS_NORM_WEIGHT:
            x = w * x
    return x


@triton.jit
def _bf16_rounded(x):
    """float32 -> the nearest bfloat16 value (ties to even), still float32. On the GPU by the
    conversion instruction; in the interpreter, whose own conversion truncates, by integer
    arithmetic (infinities stay; a NaN may round to a zero, and ``_dot_f32`` then carries it in
    the lo part). The integer version on the GPU cost a quarter of the down-site kernel's
    instructions (sm_90a SASS)."""
    if INTERPRETING:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:  # the hardware's conversion rounds to nearest even (cvt.rn.bf16x2.f32: one instruction a pair)
        return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _bf16_dot(a, b, acc, EMULATE: tl.constexpr):
    """bfloat16 tiles (given as float32 holding bfloat16 values) multiplied, float32
    accumulation. ``EMULATE`` (the interpreter, whose bfloat16 dot is broken in Triton 3.7): the
    same exact products in a float32 dot."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=tl.float32)


@triton.jit
def _bf16_parts(x):
    """float32 -> (hi, lo), both bfloat16 values held as float32: ``hi + lo`` is ``x`` to 16
    significant bits (relative residual 2^-18)."""
    hi = _bf16_rounded(x)
    return hi, _bf16_rounded(x - hi)


@triton.jit
def _bf16_pair(x):
    """float32 -> (hi, lo) as ``_bf16_parts``, held as bfloat16 tensors (the dots' operand type:
    converted once, half the registers); float32 in the interpreter (see ``_bf16_dot``)."""
    hi, lo = _bf16_parts(x)
    if INTERPRETING:
        return hi, lo
    else:
        return hi.to(tl.bfloat16), lo.to(tl.bfloat16)


@triton.jit
def _bf16x3_acc(a_hi, a_lo, b_hi, b_lo, acc, A_IS_BF16: tl.constexpr):
    """``acc + (a_hi + a_lo) @ (b_hi + b_lo)`` in three bfloat16 products, the small terms first
    (``_dot_f32``'s bf16x3 on operands already split; ``A_IS_BF16``: ``a_lo`` is zero, skipped)."""
    if not A_IS_BF16:
        acc = _bf16_dot(a_lo, b_hi, acc, INTERPRETING)
    acc = _bf16_dot(a_hi, b_lo, acc, INTERPRETING)
    return _bf16_dot(a_hi, b_hi, acc, INTERPRETING)


@triton.jit
def _dot_f32_split_b(a, b_hi, b_lo):
    """``_dot_f32``'s bf16x3 ``a @ b`` with ``b`` given as its bfloat16 parts."""
    a_hi, a_lo = _bf16_parts(a)
    return _bf16x3_acc(a_hi, a_lo, b_hi, b_lo, tl.zeros([a.shape[0], b_hi.shape[1]], dtype=tl.float32), False)


@triton.jit
def _dot_f32(a, b, PRECISION: tl.constexpr, A_IS_BF16: tl.constexpr = False):
    """``a @ b`` of float32 tiles to about float32 accuracy on tensor cores.

    ``"tf32x3"``: Triton's three TF32 products (hi·hi + hi·lo + lo·hi). ``"bf16x3"``: each
    operand split into bfloat16 hi + lo (16 significant bits, relative residual 2^-18), three
    bfloat16 products, small terms first, float32 accumulation: about 1e-5 relative, at the
    tensor-core work of 1.5 TF32 products instead of 3 (two with ``A_IS_BF16``: ``a`` holds
    bfloat16 values, so its lo part is zero). ``"ieee"``: exact float32 (FMAs)."""
    if PRECISION == "bf16x3":
        b_hi, b_lo = _bf16_parts(b)
        acc = tl.zeros([a.shape[0], b.shape[1]], dtype=tl.float32)
        if A_IS_BF16:
            return _bf16x3_acc(a, a, b_hi, b_lo, acc, True)
        a_hi, a_lo = _bf16_parts(a)
        return _bf16x3_acc(a_hi, a_lo, b_hi, b_lo, acc, False)
    elif PRECISION == "bf16":
        # one bfloat16 product: about 2^-9 relative, not the reference's float32 (probes only)
        a_hi = a if A_IS_BF16 else _bf16_rounded(a)
        return _bf16_dot(a_hi, _bf16_rounded(b), tl.zeros([a.shape[0], b.shape[1]], dtype=tl.float32), INTERPRETING)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _scaled(x, scale, EXACT_DIV: tl.constexpr):
    """``x / scale`` (``scale`` broadcast): correctly rounded with ``EXACT_DIV``, else as
    ``x · (1 / scale)`` (one multiply an element instead of a division's ~20 instructions)."""
    if EXACT_DIV:
        return tl.math.div_rn(x, tl.broadcast_to(scale, x.shape))
    else:
        return x * tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _scale_zero(lo, hi, QMIN: tl.constexpr, LEVELS: tl.constexpr):
    """A token's scale and zero point from its min and max (already clamped to include 0), as
    ``stq::quantize_per_token`` forms them."""
    scale = tl.math.div_rn(hi - lo, tl.full(lo.shape, LEVELS, tl.float32))
    scale = tl.where(scale > 0, scale, 1.0)
    zero = QMIN - tl.floor(tl.math.div_rn(lo, scale) + 0.5)
    return scale, zero


@triton.jit
def _quantize_store(x, rows, row_ok, i, j, ok, q_ptr, scale_ptr, zero_ptr, stride_qm,
                    D1: tl.constexpr, D2: tl.constexpr, D1P: tl.constexpr, D2P: tl.constexpr,
                    QMIN: tl.constexpr, QMAX: tl.constexpr, LEVELS: tl.constexpr, PACK: tl.constexpr,
                    BLOCK_M: tl.constexpr, EXACT_DIV: tl.constexpr):
    """Per-token asymmetric quantize of the float32 tile ``x`` [BLOCK_M, D1P, D2P] (feature
    ``i·d2 + j`` at ``[:, i, j]``), as ``stq::quantize_per_token``; stores codes (packed two a
    byte with ``PACK``), scales and zero points of ``rows``. ``EXACT_DIV``: ``x / scale``
    correctly rounded, as the reference divides; otherwise ``x · (1 / scale)``, within 1.5 ulp
    of it, for tiles whose float stages already differ from the reference's by far more."""
    x = tl.where(ok, x, 0.0)  # padding is 0 after every stage; make sure, so it cannot move lo/hi
    # over the flattened token (axis by axis, the first reduction ran a shuffle tree per row);
    # one token in any order, so no data moves between threads first
    flat = tl.reshape(x, (BLOCK_M, D1P * D2P), can_reorder=BLOCK_M == 1)
    scale, zero = _scale_zero(tl.minimum(tl.min(flat, axis=1), 0.0), tl.maximum(tl.max(flat, axis=1), 0.0), QMIN, LEVELS)
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    tl.store(zero_ptr + rows, zero.to(tl.int32), mask=row_ok)
    q_row = q_ptr + rows.to(tl.int64)[:, None, None] * stride_qm
    _store_codes(x, scale, zero, q_row, i, j, ok, row_ok[:, None, None] & (i < D1), D2, QMIN, QMAX, PACK, EXACT_DIV)


@triton.jit
def _store_codes(x, scale, zero, q_row, i, j, ok, i_ok, D2: tl.constexpr,
                 QMIN: tl.constexpr, QMAX: tl.constexpr, PACK: tl.constexpr, EXACT_DIV: tl.constexpr):
    """The codes of the float32 tile ``x`` [BLOCK_M, R, D2P] (feature ``i·d2 + j`` at
    ``[:, i, j]``; ``ok``: inside the tensor; ``i_ok``: the token and row are) given its tokens'
    ``scale`` and ``zero`` [BLOCK_M], stored from ``q_row`` (each token's first code), packed two
    a byte with ``PACK``."""
    q = tl.floor(_scaled(x, scale[:, None, None], EXACT_DIV) + 0.5) + zero[:, None, None]
    q = tl.minimum(tl.maximum(q, QMIN), QMAX).to(tl.int32)
    if PACK:
        q = tl.where(ok, q, 0)  # an odd K's padding nibble is a zero code
        even, odd = tl.split(tl.reshape(q, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
        byte = (even & 0xF) | ((odd & 0xF) << 4)
        jb = tl.arange(0, x.shape[2] // 2)[None, None, :]
        tl.store(q_row + i * (D2 // 2) + jb, byte.to(tl.uint8), mask=i_ok & (2 * jb < D2))
    else:
        tl.store(q_row + i * D2 + j, q.to(tl.int8), mask=ok)


@triton.jit
def _times_factor(a, f_ptr, hi_ptr, lo_ptr, N: tl.constexpr, NP: tl.constexpr, PRESPLIT: tl.constexpr,
                  KRON_PRECISION: tl.constexpr):
    """``a`` [rows, NP] times an N x N Kronecker factor as stored (zero past N): its bfloat16 hi
    and lo read from ``hi_ptr`` / ``lo_ptr`` (``PRESPLIT``), or the factor read and split here."""
    r = tl.arange(0, NP)
    at = r[:, None] * N + r[None, :]
    ok = (r[:, None] < N) & (r[None, :] < N)
    if PRESPLIT:
        return _dot_f32_split_b(a, tl.load(hi_ptr + at, mask=ok, other=0.0), tl.load(lo_ptr + at, mask=ok, other=0.0))
    else:
        return _dot_f32(a, tl.load(f_ptr + at, mask=ok, other=0.0).to(tl.float32), KRON_PRECISION)


@triton.jit
def _fused_quantize_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr,
    norm_w_ptr, inv_smooth_ptr, p1_ptr, p2_ptr,
    is_masked_ptr, gate_m_ptr, gate_u_ptr,
    M, stride_xm, stride_qm, eps,
    K: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D1P: tl.constexpr, D2P: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, LEVELS: tl.constexpr, PACK: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_KRON: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, KRON_PRECISION: tl.constexpr,
    p1_hi_ptr, p1_lo_ptr, p2_hi_ptr, p2_lo_ptr, PRESPLIT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    i = tl.arange(0, D1P)[None, :, None]
    j = tl.arange(0, D2P)[None, None, :]
    col = i * D2 + j  # [1, D1P, D2P]
    col_ok = (i < D1) & (j < D2)
    ok = row_ok[:, None, None] & col_ok
    x_row = x_ptr + rows.to(tl.int64)[:, None, None] * stride_xm
    x = tl.load(x_row + col, mask=ok, other=0.0).to(tl.float32)

    rstd = tl.zeros([BLOCK_M, 1, 1], dtype=tl.float32)
    norm_w = tl.zeros([1, D1P, D2P], dtype=tl.float32)  # unused without a norm weight
    if HAS_NORM:
        ss = tl.sum(tl.sum(x * x, axis=2), axis=1)
        ms = tl.math.div_rn(ss, tl.full([BLOCK_M], K, tl.float32)) + eps
        rstd = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), tl.math.sqrt_rn(ms))
        rstd = rstd[:, None, None]
        if HAS_NORM_WEIGHT:
            norm_w = tl.load(norm_w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        x = _normalised(x, rstd, norm_w, HAS_NORM, HAS_NORM_WEIGHT)

    if HAS_SMOOTH:
        x = x * tl.load(inv_smooth_ptr + col, mask=col_ok, other=0.0).to(tl.float32)

    if HAS_KRON:
        # per token Y = P1ᵀ X P2 with X the [D1, D2] view; padding rows/columns of P are zero
        # PRESPLIT (bf16x3): the factors come as their bfloat16 hi and lo parts (``_bf16_split``)
        x2d = tl.reshape(x, (BLOCK_M * D1P, D2P))
        xp2 = _times_factor(x2d, p2_ptr, p2_hi_ptr, p2_lo_ptr, D2, D2P, PRESPLIT, KRON_PRECISION)
        xp2_t = tl.permute(tl.reshape(xp2, (BLOCK_M, D1P, D2P)), (0, 2, 1))  # [BLOCK_M, D2P, D1P]
        xp2_2d = tl.reshape(xp2_t, (BLOCK_M * D2P, D1P))
        y_t = _times_factor(xp2_2d, p1_ptr, p1_hi_ptr, p1_lo_ptr, D1, D1P, PRESPLIT, KRON_PRECISION)
        x = tl.permute(tl.reshape(y_t, (BLOCK_M, D2P, D1P)), (0, 2, 1))

    if HAS_GATE:
        masked = tl.load(is_masked_ptr + rows, mask=row_ok, other=0) != 0
        g_m = tl.load(gate_m_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        g_u = tl.load(gate_u_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        x = x * tl.where(masked[:, None, None], g_m, g_u)
    _quantize_store(x, rows, row_ok, i, j, ok, q_ptr, scale_ptr, zero_ptr, stride_qm,
                    D1, D2, D1P, D2P, QMIN, QMAX, LEVELS, PACK, BLOCK_M, not (HAS_NORM or HAS_SMOOTH or HAS_KRON))


@triton.jit
def _norm_smooth(x, rstd, col, ok, norm_w_ptr, inv_smooth_ptr,
                 HAS_NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    """The RMSNorm (given the token's ``rstd``) and the smoothing of a tile of one token's
    features ``col`` (``ok``: inside the token)."""
    if HAS_NORM:
        norm_w = x  # unused without a norm weight
        if HAS_NORM_WEIGHT:
            norm_w = tl.load(norm_w_ptr + col, mask=ok, other=0.0).to(tl.float32)
        x = _normalised(x, rstd, norm_w, HAS_NORM, HAS_NORM_WEIGHT)
    if HAS_SMOOTH:
        x = x * tl.load(inv_smooth_ptr + col, mask=ok, other=0.0).to(tl.float32)
    return x


@triton.jit
def _token_kron_quantize_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr,
    norm_w_ptr, inv_smooth_ptr, p1_ptr, p2_ptr,
    is_masked_ptr, gate_m_ptr, gate_u_ptr,
    M, stride_xm, stride_qm, eps,
    K: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D1P: tl.constexpr, D2P: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, LEVELS: tl.constexpr, PACK: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_GATE: tl.constexpr,
    KRON_PRECISION: tl.constexpr, X_IS_BF16: tl.constexpr,
    p1t_hi_ptr, p1t_lo_ptr, p2_hi_ptr, p2_lo_ptr, PRESPLIT: tl.constexpr,
):
    """``_fused_quantize_kernel`` for one token a program, with a Kronecker stage whose padded
    tile is too large for that kernel's [BLOCK_M, D1P, D2P] layout (the MLP down sites: 96 x 128
    at LLaDA-8B). The token is a [D1P, D2P] tile and ``Y = P1ᵀ (X P2)`` two plain 2-D dots, with
    no transposes; the factors are re-read by every program (from L2). ``PRESPLIT`` (bf16x3):
    P1ᵀ and P2 arrive as their bfloat16 hi and lo parts (``_bf16_split``)."""
    t = tl.program_id(0)
    i = tl.arange(0, D1P)[:, None]
    j = tl.arange(0, D2P)[None, :]
    col = i * D2 + j
    col_ok = (i < D1) & (j < D2)
    x = tl.load(x_ptr + t.to(tl.int64) * stride_xm + col, mask=col_ok, other=0.0).to(tl.float32)
    rstd = 1.0
    if HAS_NORM:
        ms = tl.math.div_rn(tl.sum(tl.sum(x * x, axis=1), axis=0), K * 1.0) + eps
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(ms))
    x = _norm_smooth(x, rstd, col, col_ok, norm_w_ptr, inv_smooth_ptr, HAS_NORM, HAS_NORM_WEIGHT, HAS_SMOOTH)
    # padding rows/columns of the factors are zero
    r2 = tl.arange(0, D2P)
    p2_at, p2_ok = r2[:, None] * D2 + r2[None, :], (r2[:, None] < D2) & (r2[None, :] < D2)
    r1 = tl.arange(0, D1P)
    p1_ok = (r1[:, None] < D1) & (r1[None, :] < D1)
    # X_IS_BF16: a bfloat16 input with no float stage before the Kronecker (the down site)
    X_EXACT: tl.constexpr = X_IS_BF16 and not (HAS_NORM or HAS_SMOOTH)
    if PRESPLIT:
        p2_hi = tl.load(p2_hi_ptr + p2_at, mask=p2_ok, other=0.0)
        p2_lo = tl.load(p2_lo_ptr + p2_at, mask=p2_ok, other=0.0)
        if X_EXACT:
            xp2 = _bf16x3_acc(x, x, p2_hi, p2_lo, tl.zeros([D1P, D2P], dtype=tl.float32), True)
        else:
            xp2 = _dot_f32_split_b(x, p2_hi, p2_lo)
        p1t_at = r1[:, None] * D1 + r1[None, :]  # the transpose, stored contiguous
        xp2_hi, xp2_lo = _bf16_pair(xp2)
        x = _bf16x3_acc(tl.load(p1t_hi_ptr + p1t_at, mask=p1_ok, other=0.0),
                        tl.load(p1t_lo_ptr + p1t_at, mask=p1_ok, other=0.0),
                        xp2_hi, xp2_lo, tl.zeros([D1P, D2P], dtype=tl.float32), False)
    else:
        p2 = tl.load(p2_ptr + p2_at, mask=p2_ok, other=0.0)
        p1t = tl.load(p1_ptr + r1[None, :] * D1 + r1[:, None], mask=p1_ok, other=0.0)
        xp2 = _dot_f32(x, p2.to(tl.float32), KRON_PRECISION, X_EXACT)
        x = _dot_f32(p1t.to(tl.float32), xp2, KRON_PRECISION)
    if HAS_GATE:
        masked = tl.load(is_masked_ptr + t) != 0
        g_m = tl.load(gate_m_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        g_u = tl.load(gate_u_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        x = x * tl.where(masked, g_m, g_u)
    rows = t + tl.arange(0, 1)
    row_ok = rows < M
    _quantize_store(x[None, :, :], rows, row_ok, i[None, :, :], j[None, :, :], row_ok[:, None, None] & col_ok[None, :, :],
                    q_ptr, scale_ptr, zero_ptr, stride_qm, D1, D2, D1P, D2P, QMIN, QMAX, LEVELS, PACK, 1, False)


@triton.jit
def _token_kron_split_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr,
    norm_w_ptr, inv_smooth_ptr, lf_ptr, rf_ptr,
    is_masked_ptr, gate_m_ptr, gate_u_ptr,
    M, stride_xm, stride_qm, eps,
    lt_hi_ptr, lt_lo_ptr, rf_hi_ptr, rf_lo_ptr,
    K: tl.constexpr, D2: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, C: tl.constexpr,
    CA: tl.constexpr, CB: tl.constexpr, SPLIT_J: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, LEVELS: tl.constexpr, PACK: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_GATE: tl.constexpr,
    KRON_PRECISION: tl.constexpr, X_IS_BF16: tl.constexpr, PRESPLIT: tl.constexpr,
):
    """One token a program, ``Y = P1ᵀ X P2`` with one factor's side split into two power-of-two
    blocks ``CA + CB`` instead of padded (Dream-7B's down site, 128 x 148: the 148 columns as
    128 + 64 instead of 256; blocks narrower than 64, such as LLaDA-8B's 96 rows as 64 + 32, only
    in the interpreter: ``MIN_SPLIT_BLOCK``).
    The tile is [RP, CA] + [RP, CB]: the unsplit side along its rows, so that every product has a
    full warpgroup's M. In those terms the transform is ``L · T · Rf``, T the token's matrix with
    the unsplit side first, ``L`` the left factor's transpose, ``Rf`` the right factor:
    ``SPLIT_J`` (columns split): T = X, L = P1ᵀ, Rf = P2, feature ``r·d2 + c``; otherwise (rows
    split) T = Xᵀ, L = P2ᵀ, Rf = P1, feature ``c·d2 + r``. With ``Rf = [[A, B], [C, D]]`` in the
    split blocks, ``W = L T`` by column blocks, ``Ya = Wa A + Wb C``, ``Yb = Wa B + Wb D``;
    every product bf16x3, each operand split once (``PRESPLIT``: the factors arrive split,
    ``_bf16_split``; ``lf_ptr`` / ``rf_ptr``: the factors as stored, read otherwise). The min and
    max run over both blocks, then each is quantized and stored. (``KRON_PRECISION`` must be
    bf16x3.)"""
    tl.static_assert(KRON_PRECISION == "bf16x3")
    tl.static_assert(CA + CB >= C)
    t = tl.program_id(0)
    r = tl.arange(0, RP)[:, None]  # the unsplit side along the tiles' rows
    ca = tl.arange(0, CA)[None, :]
    cb = CA + tl.arange(0, CB)[None, :]
    if SPLIT_J:
        col_a, col_b = r * D2 + ca, r * D2 + cb
    else:
        col_a, col_b = ca * D2 + r, cb * D2 + r
    ok_a, ok_b = (ca < C) & (r < R), (cb < C) & (r < R)
    x_row = x_ptr + t.to(tl.int64) * stride_xm
    xa = tl.load(x_row + col_a, mask=ok_a, other=0.0).to(tl.float32)
    xb = tl.load(x_row + col_b, mask=ok_b, other=0.0).to(tl.float32)
    rstd = 1.0
    if HAS_NORM:
        ss = tl.sum(tl.sum(xa * xa, axis=1), axis=0) + tl.sum(tl.sum(xb * xb, axis=1), axis=0)
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(ss, K * 1.0) + eps))
    xa = _norm_smooth(xa, rstd, col_a, ok_a, norm_w_ptr, inv_smooth_ptr, HAS_NORM, HAS_NORM_WEIGHT, HAS_SMOOTH)
    xb = _norm_smooth(xb, rstd, col_b, ok_b, norm_w_ptr, inv_smooth_ptr, HAS_NORM, HAS_NORM_WEIGHT, HAS_SMOOTH)
    rr = tl.arange(0, RP)
    l_ok = (rr[:, None] < R) & (rr[None, :] < R)
    if PRESPLIT:
        l_hi = tl.load(lt_hi_ptr + rr[:, None] * R + rr[None, :], mask=l_ok, other=0.0)
        l_lo = tl.load(lt_lo_ptr + rr[:, None] * R + rr[None, :], mask=l_ok, other=0.0)
    else:  # Lᵀ as stored: L[r, r'] = lf[r', r]
        l_hi, l_lo = _bf16_pair(tl.load(lf_ptr + rr[None, :] * R + rr[:, None], mask=l_ok, other=0.0).to(tl.float32))
    # X_IS_BF16: a bfloat16 input with no float stage before the Kronecker (the down sites): its
    # lo part is zero, so two products (L's lo and hi against T)
    X_EXACT: tl.constexpr = X_IS_BF16 and not (HAS_NORM or HAS_SMOOTH)
    if X_EXACT:
        if not INTERPRETING:  # bfloat16 values: converted exactly
            xa, xb = xa.to(tl.bfloat16), xb.to(tl.bfloat16)
        wa = _bf16_dot(l_lo, xa, tl.zeros([RP, CA], dtype=tl.float32), INTERPRETING)
        wa = _bf16_dot(l_hi, xa, wa, INTERPRETING)
        wb = _bf16_dot(l_lo, xb, tl.zeros([RP, CB], dtype=tl.float32), INTERPRETING)
        wb = _bf16_dot(l_hi, xb, wb, INTERPRETING)
    else:
        xa_hi, xa_lo = _bf16_pair(xa)
        xb_hi, xb_lo = _bf16_pair(xb)
        wa = _bf16x3_acc(l_hi, l_lo, xa_hi, xa_lo, tl.zeros([RP, CA], dtype=tl.float32), False)
        wb = _bf16x3_acc(l_hi, l_lo, xb_hi, xb_lo, tl.zeros([RP, CB], dtype=tl.float32), False)
    wa_hi, wa_lo = _bf16_pair(wa)
    wb_hi, wb_lo = _bf16_pair(wb)
    ia = tl.arange(0, CA)
    ib = CA + tl.arange(0, CB)
    a_hi, a_lo = _factor_parts(rf_ptr, rf_hi_ptr, rf_lo_ptr, ia, ia, C, PRESPLIT)
    c_hi, c_lo = _factor_parts(rf_ptr, rf_hi_ptr, rf_lo_ptr, ib, ia, C, PRESPLIT)
    ya = _bf16x3_acc(wb_hi, wb_lo, c_hi, c_lo, tl.zeros([RP, CA], dtype=tl.float32), False)
    ya = _bf16x3_acc(wa_hi, wa_lo, a_hi, a_lo, ya, False)
    b_hi, b_lo = _factor_parts(rf_ptr, rf_hi_ptr, rf_lo_ptr, ia, ib, C, PRESPLIT)
    d_hi, d_lo = _factor_parts(rf_ptr, rf_hi_ptr, rf_lo_ptr, ib, ib, C, PRESPLIT)
    yb = _bf16x3_acc(wb_hi, wb_lo, d_hi, d_lo, tl.zeros([RP, CB], dtype=tl.float32), False)
    yb = _bf16x3_acc(wa_hi, wa_lo, b_hi, b_lo, yb, False)
    if HAS_GATE:
        masked = tl.load(is_masked_ptr + t) != 0
        ya = ya * tl.where(masked, tl.load(gate_m_ptr + col_a, mask=ok_a, other=0.0).to(tl.float32),
                           tl.load(gate_u_ptr + col_a, mask=ok_a, other=0.0).to(tl.float32))
        yb = yb * tl.where(masked, tl.load(gate_m_ptr + col_b, mask=ok_b, other=0.0).to(tl.float32),
                           tl.load(gate_u_ptr + col_b, mask=ok_b, other=0.0).to(tl.float32))
    # padding is 0 after every stage; make sure, so it cannot move lo/hi
    ya = tl.where(ok_a, ya, 0.0)
    yb = tl.where(ok_b, yb, 0.0)
    flat_a = tl.reshape(ya, (1, RP * CA), can_reorder=True)
    flat_b = tl.reshape(yb, (1, RP * CB), can_reorder=True)
    lo = tl.minimum(tl.minimum(tl.min(flat_a, axis=1), tl.min(flat_b, axis=1)), 0.0)
    hi = tl.maximum(tl.maximum(tl.max(flat_a, axis=1), tl.max(flat_b, axis=1)), 0.0)
    scale, zero = _scale_zero(lo, hi, QMIN, LEVELS)
    rows = t + tl.arange(0, 1)
    row_ok = rows < M
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    tl.store(zero_ptr + rows, zero.to(tl.int32), mask=row_ok)
    q_row = q_ptr + rows.to(tl.int64) * stride_qm
    _store_token_codes(ya, scale, zero, q_row, col_a, ok_a & row_ok[:, None], SPLIT_J, QMIN, QMAX, PACK)
    _store_token_codes(yb, scale, zero, q_row, col_b, ok_b & row_ok[:, None], SPLIT_J, QMIN, QMAX, PACK)


@triton.jit
def _factor_block(f_ptr, r, c, N: tl.constexpr):
    """Rows ``r`` x columns ``c`` of an N x N factor (zero past N), as stored."""
    return tl.load(f_ptr + r[:, None] * N + c[None, :], mask=(r[:, None] < N) & (c[None, :] < N), other=0.0)


@triton.jit
def _factor_parts(f_ptr, hi_ptr, lo_ptr, r, c, N: tl.constexpr, PRESPLIT: tl.constexpr):
    """A block of a factor as bfloat16 (hi, lo): loaded split, or split here."""
    if PRESPLIT:
        return _factor_block(hi_ptr, r, c, N), _factor_block(lo_ptr, r, c, N)
    else:
        return _bf16_pair(_factor_block(f_ptr, r, c, N).to(tl.float32))


@triton.jit
def _store_token_codes(y, scale, zero, q_row, feat, ok, PAIRS_ALONG_COLS: tl.constexpr,
                       QMIN: tl.constexpr, QMAX: tl.constexpr, PACK: tl.constexpr):
    """The codes of one token's tile ``y`` (feature ``feat`` at each place; ``ok``: a feature of
    the token) given its ``scale`` and ``zero`` [1] (after float stages: ``y · (1 / scale)``),
    stored from ``q_row`` [1]; with ``PACK`` two a byte, features 2b and 2b + 1 (neighbours
    along the columns with ``PAIRS_ALONG_COLS``, else along the rows)."""
    q = tl.floor(_scaled(y, scale[:, None], False) + 0.5) + zero[:, None]
    q = tl.minimum(tl.maximum(q, QMIN), QMAX).to(tl.int32)
    if PACK:
        q = tl.where(ok, q, 0)  # an odd K's padding nibble is a zero code
        if PAIRS_ALONG_COLS:
            even, odd = tl.split(tl.reshape(q, (y.shape[0], y.shape[1] // 2, 2)))
            f_even, _ = tl.split(tl.reshape(feat, (y.shape[0], y.shape[1] // 2, 2)))
            ok_even, _ = tl.split(tl.reshape(ok.to(tl.int32), (y.shape[0], y.shape[1] // 2, 2)))
        else:
            even, odd = tl.split(tl.permute(tl.reshape(q, (y.shape[0] // 2, 2, y.shape[1])), (0, 2, 1)))
            f_even, _ = tl.split(tl.permute(tl.reshape(feat, (y.shape[0] // 2, 2, y.shape[1])), (0, 2, 1)))
            ok_even, _ = tl.split(tl.permute(tl.reshape(ok.to(tl.int32), (y.shape[0] // 2, 2, y.shape[1])), (0, 2, 1)))
        byte = (even & 0xF) | ((odd & 0xF) << 4)
        tl.store(q_row + f_even // 2, byte.to(tl.uint8), mask=ok_even != 0)
    else:
        tl.store(q_row + feat, q.to(tl.int8), mask=ok)


@triton.jit
def _chunk_token_rows(x_t, norm_w_ptr, inv_smooth_ptr, rstd, kc, i, c,
                      D1: tl.constexpr, D2: tl.constexpr, CH: tl.constexpr,
                      HAS_NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    """Columns ``kc·CH ..`` of one token's [D1P, D2] matrix after the norm and smoothing (zero
    past D1 and D2), float32 [D1P, CH]."""
    kcol = kc * CH + c
    ok = (i < D1) & (kcol < D2)
    col = i * D2 + kcol
    x = tl.load(x_t + col, mask=ok, other=0.0).to(tl.float32)
    return _norm_smooth(x, rstd, col, ok, norm_w_ptr, inv_smooth_ptr, HAS_NORM, HAS_NORM_WEIGHT, HAS_SMOOTH)


@triton.jit
def _chunk_kron_quantize_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr,
    norm_w_ptr, inv_smooth_ptr, p1_ptr, p2_ptr,
    is_masked_ptr, gate_m_ptr, gate_u_ptr, y_ptr,
    p1t_hi_ptr, p1t_lo_ptr, p2_hi_ptr, p2_lo_ptr,
    M, stride_xm, stride_qm, eps,
    K: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D1P: tl.constexpr, CH: tl.constexpr, NCH: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, LEVELS: tl.constexpr, PACK: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_GATE: tl.constexpr,
    KRON_PRECISION: tl.constexpr, X_IS_BF16: tl.constexpr, PRESPLIT: tl.constexpr,
):
    """``_token_kron_quantize_kernel`` for a second factor too large for one tile (Dream-7B's MLP
    down site, 128 x 148: padded to 128 x 256, P2 alone would need 256 KB of shared memory).

    Each program takes tokens ``pid, pid + programs, ...`` and, per token, the columns of
    ``Y = P1ᵀ (X P2)`` ``CH`` at a time: ``(X P2)[:, chunk] = Σ_kc X[:, kc] P2[kc, chunk]`` as
    [D1P, CH] x [CH, CH] dots, then ``P1ᵀ`` times it. The gated chunks go to the program's own
    float32 row of ``y_ptr`` (``programs x K``: 10 MB on an H200 at Dream-7B, it stays in L2) while the
    token's min and max accumulate; after a barrier the row is read back and quantized. The
    factors' padding is zero, so the padded columns of Y are too.

    ``PRESPLIT`` (bf16x3): the factors come as their bfloat16 hi and lo parts (P1ᵀ's and P2's,
    ``_bf16_split``, made once on the host), so no program re-splits them: the split of P1ᵀ
    for every column chunk and of P2 for every (chunk, chunk) pair of every token took about a
    third of the kernel's instructions (sm_90a SASS)."""
    pid = tl.program_id(0)
    y_row = y_ptr + pid.to(tl.int64) * K
    i = tl.arange(0, D1P)[:, None]
    c = tl.arange(0, CH)[None, :]
    r = tl.arange(0, CH)
    r1 = tl.arange(0, D1P)
    p1t_ok = (r1[:, None] < D1) & (r1[None, :] < D1)
    a_is_bf16: tl.constexpr = X_IS_BF16 and not (HAS_NORM or HAS_SMOOTH)
    for t in range(pid, M, tl.num_programs(0)):
        t64 = tl.cast(t, tl.int64)  # (an int in the interpreter)
        x_t = x_ptr + t64 * stride_xm
        rstd = tl.full([], 1.0, tl.float32)
        if HAS_NORM:
            ss = tl.zeros([], dtype=tl.float32)
            for kc in range(NCH):
                xk = _chunk_token_rows(x_t, norm_w_ptr, inv_smooth_ptr, rstd, kc, i, c, D1, D2, CH, False, False, False)
                ss += tl.sum(tl.sum(xk * xk, axis=1), axis=0)
            rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(ss, K * 1.0) + eps))
        masked = False
        if HAS_GATE:
            masked = tl.load(is_masked_ptr + t) != 0
        lo = tl.zeros([], dtype=tl.float32)
        hi = tl.zeros([], dtype=tl.float32)
        for jc in range(NCH):
            jcol = jc * CH + c  # [1, CH]
            acc = tl.zeros([D1P, CH], dtype=tl.float32)
            for kc in range(NCH):
                xk = _chunk_token_rows(x_t, norm_w_ptr, inv_smooth_ptr, rstd, kc, i, c, D1, D2, CH,
                                       HAS_NORM, HAS_NORM_WEIGHT, HAS_SMOOTH)
                krow = kc * CH + r[:, None]
                p2_ok = (krow < D2) & (jcol < D2)
                # bf16x3 accumulates into acc the same way whether the factor comes split or is
                # split here: the same bits either way
                if PRESPLIT:
                    p2_hi = tl.load(p2_hi_ptr + krow * D2 + jcol, mask=p2_ok, other=0.0)
                    p2_lo = tl.load(p2_lo_ptr + krow * D2 + jcol, mask=p2_ok, other=0.0)
                elif KRON_PRECISION == "bf16x3":
                    p2_hi, p2_lo = _bf16_pair(tl.load(p2_ptr + krow * D2 + jcol, mask=p2_ok, other=0.0).to(tl.float32))
                if PRESPLIT or KRON_PRECISION == "bf16x3":
                    if a_is_bf16:
                        acc = _bf16x3_acc(xk, xk, p2_hi, p2_lo, acc, True)
                    else:
                        xk_hi, xk_lo = _bf16_parts(xk)
                        acc = _bf16x3_acc(xk_hi, xk_lo, p2_hi, p2_lo, acc, False)
                else:
                    p2 = tl.load(p2_ptr + krow * D2 + jcol, mask=p2_ok, other=0.0)
                    acc += _dot_f32(xk, p2.to(tl.float32), KRON_PRECISION, a_is_bf16)
            if PRESPLIT:
                p1t_hi = tl.load(p1t_hi_ptr + r1[:, None] * D1 + r1[None, :], mask=p1t_ok, other=0.0)
                p1t_lo = tl.load(p1t_lo_ptr + r1[:, None] * D1 + r1[None, :], mask=p1t_ok, other=0.0)
                acc_hi, acc_lo = _bf16_parts(acc)
                y = _bf16x3_acc(p1t_hi, p1t_lo, acc_hi, acc_lo, tl.zeros([D1P, CH], dtype=tl.float32), False)
            else:
                p1t = tl.load(p1_ptr + r1[None, :] * D1 + r1[:, None], mask=p1t_ok, other=0.0)
                y = _dot_f32(p1t.to(tl.float32), acc, KRON_PRECISION)
            ok = (i < D1) & (jcol < D2)
            if HAS_GATE:
                g_m = tl.load(gate_m_ptr + i * D2 + jcol, mask=ok, other=0.0).to(tl.float32)
                g_u = tl.load(gate_u_ptr + i * D2 + jcol, mask=ok, other=0.0).to(tl.float32)
                y = y * tl.where(masked, g_m, g_u)
            y = tl.where(ok, y, 0.0)
            lo = tl.minimum(lo, tl.min(tl.min(y, axis=1), axis=0))
            hi = tl.maximum(hi, tl.max(tl.max(y, axis=1), axis=0))
            tl.store(y_row + i * D2 + jcol, y, mask=ok)
        tl.debug_barrier()  # the row's chunks, stored by every thread, are read back by others
        scale, zero = _scale_zero(lo, hi, QMIN, LEVELS)
        tl.store(scale_ptr + t, scale)
        tl.store(zero_ptr + t, zero.to(tl.int32))
        q_row = q_ptr + t64 * stride_qm
        for jc in range(NCH):
            jcol = jc * CH + c
            ok = (i < D1) & (jcol < D2)
            y = tl.load(y_row + i * D2 + jcol, mask=ok, other=0.0, cache_modifier=".cg")
            q = tl.floor(_scaled(y, scale, False) + 0.5) + zero
            q = tl.minimum(tl.maximum(q, QMIN), QMAX).to(tl.int32)
            if PACK:
                q = tl.where(ok, q, 0)
                even, odd = tl.split(tl.reshape(q, (D1P, CH // 2, 2)))
                byte = (even & 0xF) | ((odd & 0xF) << 4)
                jb = jc * (CH // 2) + tl.arange(0, CH // 2)[None, :]
                tl.store(q_row + i * (D2 // 2) + jb, byte.to(tl.uint8), mask=(i < D1) & (2 * jb < D2))
            else:
                tl.store(q_row + i * D2 + jcol, q.to(tl.int8), mask=ok)
        tl.debug_barrier()  # before the next token overwrites the row


@triton.jit
def _tac_affine_kernel(z_ptr, m_ptr, d_ptr, out_ptr, M, stride_zm, stride_om, G: tl.constexpr, BLOCK_T: tl.constexpr):
    """TAC on one block of G channels for BLOCK_T tokens: ``out = z M_bᵀ + d_b`` as one
    [BLOCK_T, G] x [G, G] float32 dot, float32 out. M_b is read once per tile of tokens."""
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < M
    g = tl.arange(0, G)
    z = tl.load(z_ptr + t.to(tl.int64)[:, None] * stride_zm + b * G + g[None, :], mask=t_ok[:, None], other=0.0)
    m_t = tl.load(m_ptr + b * G * G + g[None, :] * G + g[:, None])  # M_bᵀ: [G in, G out]
    out = tl.dot(z.to(tl.float32), m_t.to(tl.float32), input_precision="ieee")
    out = out + tl.load(d_ptr + b * G + g).to(tl.float32)[None, :]
    tl.store(out_ptr + t.to(tl.int64)[:, None] * stride_om + b * G + g[None, :], out, mask=t_ok[:, None])


def tac_affine_triton(z: torch.Tensor, tac_m: torch.Tensor, tac_d: torch.Tensor) -> torch.Tensor:
    """``stq::tac_block_affine`` on a [m, K] activation, in float32 (the fused site's TAC stage).

    Its own kernel: in the activation kernel, whose programs hold a token or two, each program
    re-read all of M (128 MB of L2 reads a call at 1024 tokens of LLaDA-8B) and the site cost
    350 µs on the H200 against 38 µs without TAC; as a [tokens, g] x [g, g] dot per block, then
    the activation kernel on its float32 output, 64 µs (``benchmarks/explore/quantize_sites.py``).
    """
    m, k = z.shape
    g = tac_m.shape[1]
    out = torch.empty((m, k), dtype=torch.float32, device=z.device)
    if m == 0:
        return out
    # tl.dot wants every dimension >= 16 (g = 16 by default); smaller blocks embed in a 16 x 16
    # block-diagonal tile, exactly: the added products are with zeros
    group = max(16, next_power_of_2(g))
    tac_m = tac_m.float()
    if group % g or k % group:  # blocks that do not tile 16 (g = 12, say): PyTorch
        return tac_ops.tac_block_affine_reference(z.float(), tac_m, tac_d.float())
    if group != g:
        tiles = tac_m.new_zeros(k // group, group, group)
        per = group // g
        for i in range(per):
            tiles[:, i * g:(i + 1) * g, i * g:(i + 1) * g] = tac_m[i::per]
        tac_m = tiles
    block_t = 64 if INTERPRET else TAC_BLOCK_T
    extra = {} if INTERPRET else {"num_warps": TAC_WARPS}
    with _device_of(z):
        _tac_affine_kernel[(k // group, cdiv(m, block_t))](
            z, tac_m.contiguous(), tac_d.float().contiguous(), out, m, z.stride(0), out.stride(0), G=group, BLOCK_T=block_t,
            **extra,
        )
    return out


# _tac_affine_kernel's launch: tokens a program and warps. H200 (benchmarks/explore/tac_kernel.py,
# results/explore-tac-kernel-h200.json), LLaDA-8B's width at 1024 / 4096 tokens: 1 warp 13.3 / 49.3
# µs against 19.1 / 70.7 at 4 (fastest or within 1 µs of it at every shape; 256 tokens at 2 warps
# alike; why was not profiled). In the model it was the other way round: one lease, CUDA graphs,
# LLaDA-8B at 1 x 1024 (speed.py --set ...TAC_WARPS=4, then without): 21.01 ms a step at 4 warps
# (p20-p80 20.84-21.09) against 21.40 at 1 (21.33-21.49), float16 27.25 / 27.12: one pair of
# runs, within what leases differ by, so 4 warps stays as the configuration the speed table measured.
TAC_BLOCK_T = 128
TAC_WARPS = 4


# The Kronecker stage of ``_fused_quantize_kernel`` holds a few tokens' padded [D1P, D2P] matrices
# and both factors in one program (the dots stage them through shared memory): up to 64 x 128
# float32 (LLaDA's and Dream's hidden sizes: 64 x 64). Up to MAX_TOKEN_KRON_TILE (LLaDA-8B's MLP
# down site, 96 x 128 padded to 128 x 128) ``_token_kron_quantize_kernel`` takes one token a
# program: on sm_90a, bf16x3, 8 warps: 96 KB of shared memory, 185 registers and no spills, or
# 128 and ~300 bytes of spills under TOKEN_KRON_MAXNREG (4 and 16 warps spilled kilobytes and ran
# 2-3x slower, before the instruction cuts of 2026-11-29). Where splitting one side into two
# power-of-two blocks leaves a smaller tile (``token_split``: LLaDA-8B's down site, 96 = 64 + 32
# rows; Dream-7B's, 148 = 128 + 32 columns), ``_token_kron_split_kernel`` runs instead (SPLIT_TOKEN_ROWS,
# blocks of at least 64: Dream-7B's down site only). Larger ones (Dream-7B's down site without
# the split, 128 x 148 padded to 128 x 256, whose P2 alone would be 256 KB of shared memory) go through
# ``_chunk_kron_quantize_kernel``: 64 KB of shared memory, 255 registers, 56 bytes of spills at
# 8 warps (one program a multiprocessor); H200, 1024 tokens: 360 µs against 505 with the
# Kronecker in PyTorch (259 since the instruction cuts); at LLaDA-8B's 96 x 128 it took 224 µs
# against the token kernel's 163 (benchmarks/explore/down_site.py). 32-column chunks (no spills)
# took 387. Both now read their factors split on the host (TOKEN_KRON_PRESPLIT, CHUNK_KRON_PRESPLIT):
# H200, 1024 tokens, LLaDA-8B's down site 81 µs, Dream-7B's 216 (the chunk kernel).
MAX_FUSED_KRON_TILE = 8192
MAX_TOKEN_KRON_TILE = 16384
TOKEN_KRON_WARPS = 8
# registers a thread at most (ptxas -maxrregcount), for more programs a multiprocessor; None: ptxas's
# choice. H200, 1024 / 4096 tokens (benchmarks/explore/quantize_sites.py --registers): the token
# kernel capped at 128 (two programs a multiprocessor, ~300 bytes of spills) ran 92 / 350 µs
# against 97 / 386 uncapped (185 registers) with a word-store variant not kept; with the byte
# stores kept, 96 against 95 at 1024 tokens (not measured at 4096). 112 spills 836 bytes: 117-121
# / 468. The speed rows were measured with the cap. The 64 x 64 sites gain nothing at 1024 tokens
# from 128 or 80 (at 80, 61 against 67 µs at 4096; o 38 against 37 at 1024), lose at 64.
# With the factors split on the host (TOKEN_KRON_PRESPLIT) the kernel reads them from 128 KB of
# shared memory, one program a multiprocessor whatever the registers: uncapped (188 registers, no
# spills, 2064 sm_90a instructions a token against 2288 at 128) it ran LLaDA-8B's down site in 81
# µs at 1024 tokens, against 93 capped and 95 splitting the factors in the kernel (capped, two
# programs a multiprocessor; benchmarks/results/explore-quantize-sites-presplit-h200.json).
TOKEN_KRON_MAXNREG = None
QUANTIZE_MAXNREG = None
# Above MAX_TOKEN_KRON_TILE, ``_chunk_kron_quantize_kernel`` takes the second factor KRON_CHUNK
# columns at a time when the first one's padded P1ᵀ fits a program (D1P <= MAX_CHUNK_KRON_D1),
# CHUNK_KRON_PROGRAMS programs a multiprocessor (two ran no faster); larger first factors run the
# float stages in PyTorch.
KRON_CHUNK = 64
MAX_CHUNK_KRON_D1 = 128
CHUNK_KRON_WARPS = 8
CHUNK_KRON_PROGRAMS = 1
# the chunk kernel's factors split into bfloat16 hi + lo once on the host (``_bf16_split``)
# instead of in every program for every chunk: Dream-7B's down site, sm_90a SASS weighted by its
# loops' trip counts, about 4600 instructions a token against 6400; 199 registers and no spills
# against 255 and 56 bytes, 96 KB of shared memory against 64 (one program a multiprocessor
# either way); H200, 1024 tokens: 216 µs against 258.
CHUNK_KRON_PRESPLIT = True

# _dot_f32's precision for the Kronecker stage (float32 operands; see there). H200, 1024 tokens,
# against tf32x3 (benchmarks/explore/quantize_sites.py, down_site.py): LLaDA-8B q/k/v 17 / 34 µs,
# o (TAC kernel + this) 37 / 57, down 95 / 194 (one token a program; 256 as PyTorch FFMA + kernel).
KRON_PRECISION = "bf16x3"


# ``_token_kron_split_kernel``: the one-token kernel with the first factor's rows as two
# power-of-two blocks where that is smaller than padding them (LLaDA-8B's down site: 96 = 64 + 32
# rows instead of 128; 36 % less tensor-core work, 25 % fewer elements). Static sm_90a SASS a
# token (hopper_codegen.quantize_variant, compiled here): 2328 instructions at 128 registers
# (48 bytes of spills) against the padded kernel's 2736 (272); uncapped 2160 at 142 registers
# against 2352 at 193. The same split with the D1 blocks as the products' M (32-row dots:
# mma.sync, 2224 bytes of spills) took 4096.
# With 64 + 32 or 128 + 32 blocks the kernel computed wrong codes or faulted ("illegal memory
# access") on the H200 (Triton 3.6), correct at 48 x 64 and in the interpreter: Triton's known Hopper
# bug with several tl.dot in one kernel and a dot dimension of 16 or 32 (triton-lang/triton#10486,
# #11366; helion works around it with dot blocks of 64 and up). So a block is at least
# MIN_SPLIT_BLOCK wide: LLaDA-8B's 96 rows would be 64 + 64, its padding, and get no split;
# Dream-7B's 148 columns run as 128 + 64 instead of padded to 256 (no dot narrower than 64): on the
# H200 exact at 1, 7, 1024 and 4096 tokens (cuda-checks-fused-h200.txt entry 27), 150 µs at 1024
# tokens against the chunk kernel's 216 (explore-quantize-sites-h200.json). Factoring LLaDA-8B's
# 12288 as 64 x 192 instead (128 + 64 columns, no padding, 25 % fewer MACs than the padded
# 128 x 128) compiles here to 2360 sm_90a instructions a token uncapped (254 registers) or 3160 at
# 128 (768 bytes of spills), against the padded 96 x 128 kernel's 2064 (hopper_codegen.quantize_variant):
# no gain to expect, so the factors stay balanced.
SPLIT_TOKEN_ROWS = True
MIN_SPLIT_BLOCK = 64
# the split tile's limit: Dream-7B's down site 128 x (128 + 64). At 8 warps, factors split on the
# host, sm_90a SASS a token: 2944 instructions at 251 registers and no spills, 112 KB of shared
# memory (one program a multiprocessor, as the chunk kernel runs; 16 warps: 128 registers, 640
# bytes of spills, 3440 a thread). The chunk kernel, ~4600 weighted by its loops, takes 216 µs
# at 1024 tokens on the H200; LLaDA-8B's token kernel, 2064 instructions at one program a
# multiprocessor, 81. (128 + 32: 2568 instructions at 250 registers.)
MAX_TOKEN_SPLIT_TILE = 24576
TOKEN_SPLIT_WARPS = 8
TOKEN_SPLIT_MAXNREG = 128


def token_split_maxnreg(tile: int) -> Optional[int]:
    """The register cap of ``_token_kron_split_kernel`` for a tile of this many elements:
    TOKEN_SPLIT_MAXNREG (two programs a multiprocessor) up to MAX_TOKEN_KRON_TILE, none above
    (one program a multiprocessor, no spills)."""
    return TOKEN_SPLIT_MAXNREG if tile <= MAX_TOKEN_KRON_TILE else None
# the one-token kernels' factors split into bfloat16 hi + lo once on the host (``_bf16_split``).
# The split kernel, sm_90a SASS a token: 1784 instructions at 128 registers (8 bytes of spills),
# 90 KB of shared memory (two programs a multiprocessor still), against 2328 splitting them in
# every program and the padded kernel's 2736.
TOKEN_KRON_PRESPLIT = True
# the same for ``_fused_quantize_kernel`` (the 64 x 64 sites, two tokens a program: splitting the
# factors in every program cost as much as splitting the tokens)
FUSED_KRON_PRESPLIT = True


def token_row_blocks(d1: int) -> Optional[tuple[int, int]]:
    """(D1A, D1B): ``d1`` rows as two power-of-two blocks of at least MIN_SPLIT_BLOCK (and 16,
    ``tl.dot``'s minimum) summing to less than ``d1`` padded to a power of two, or None (no gain,
    the kernel is off, or bf16x3 is not the Kronecker precision: the split kernel is written for
    it)."""
    least = max(16, MIN_SPLIT_BLOCK)
    padded = max(16, next_power_of_2(d1))
    first = padded // 2
    second = max(least, next_power_of_2(max(d1 - first, 1)))
    if not SPLIT_TOKEN_ROWS or KRON_PRECISION != "bf16x3" or first < least or first + second >= padded:
        return None
    return first, second


def token_split(d1: int, d2: int) -> Optional[tuple[bool, int, int]]:
    """``(split_j, CA, CB)`` for ``_token_kron_split_kernel``: the side of the d1 x d2 token
    (``split_j``: the d2 columns, else the d1 rows) split into power-of-two blocks ``CA + CB``
    (``token_row_blocks``), the one that leaves the smaller tile, if that is at most
    MAX_TOKEN_SPLIT_TILE elements and smaller than the padded tile; else None."""
    d1p, d2p = max(16, next_power_of_2(d1)), max(16, next_power_of_2(d2))
    options = []
    for split_j, side, other_p in ((False, d1, d2p), (True, d2, d1p)):
        blocks = token_row_blocks(side)
        if blocks is not None and other_p * sum(blocks) <= MAX_TOKEN_SPLIT_TILE:
            options.append((other_p * sum(blocks), (split_j, *blocks)))
    return min(options)[1] if options else None


def _kron_tile(d1: int, d2: int) -> int:
    return max(16, next_power_of_2(d1)) * max(16, next_power_of_2(d2))


def _kron_chunked(d1: int, d2: int) -> bool:
    """Whether ``_chunk_kron_quantize_kernel`` runs these factors' Kronecker stage."""
    return _kron_tile(d1, d2) > MAX_TOKEN_KRON_TILE and max(16, next_power_of_2(d1)) <= MAX_CHUNK_KRON_D1


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _quantize_tile(spec, m: int) -> tuple[int, int, int, int, int]:
    """(d1, d2, D1P, D2P, BLOCK_M): the token tile and how many tokens a program takes (one for
    a Kronecker tile above MAX_FUSED_KRON_TILE: ``_token_kron_quantize_kernel``)."""
    if spec.kron is not None:
        d1, d2 = spec.kron
        # tl.dot wants every dimension >= 16
        d1p, d2p = max(16, next_power_of_2(d1)), max(16, next_power_of_2(d2))
        if d1p * d2p > MAX_TOKEN_KRON_TILE:
            raise ValueError(f"Kronecker factors {spec.kron} are too large for the fused kernels")
        if d1p * d2p > MAX_FUSED_KRON_TILE:
            return d1, d2, d1p, d2p, 1
    else:
        d1, d2 = 1, spec.features
        d1p, d2p = 1, max(2, next_power_of_2(d2))
    budget = 16384 if INTERPRET else 8192  # float32 elements a program holds per tile
    block_m = max(1, min(next_power_of_2(m), budget // (d1p * d2p)))
    return d1, d2, d1p, d2p, block_m


def _quantize_warps(elements: int) -> int:
    return 4 if elements <= 2048 else 8 if elements <= 8192 else 16


def fused_quantize_triton(
    x, bits, norm_weight=None, rms_eps=None, tac_m=None, tac_d=None, inv_smooth=None,
    p1=None, p2=None, is_masked=None, gate_masked=None, gate_unmasked=None, pack=True,
):
    """``stq::fused_quantize`` in Triton (see the module docstring)."""
    ops = _ops()
    spec = ops.fused_quantize_spec(x, bits, norm_weight, rms_eps, tac_m, tac_d, inv_smooth, p1, p2,
                                   is_masked, gate_masked, gate_unmasked, pack)
    lead, k = x.shape[:-1], x.shape[-1]
    if spec.tac_group:
        # TAC runs as its own kernel (see tac_affine_triton), then the rest on its float32 output.
        # A norm before it (the fusion pass never emits one: TAC sits before o_proj) runs in PyTorch.
        if spec.rms_norm:
            x = ops.transform_reference(x, norm_weight, rms_eps)
        z = tac_affine_triton(x.reshape(-1, k).contiguous(), tac_m, tac_d).view(*lead, k)
        return fused_quantize_triton(z, bits, inv_smooth=inv_smooth, p1=p1, p2=p2, is_masked=is_masked,
                                     gate_masked=gate_masked, gate_unmasked=gate_unmasked, pack=pack)
    if spec.kron is not None and _kron_tile(*spec.kron) > MAX_TOKEN_KRON_TILE and not _kron_chunked(*spec.kron):
        # A first factor too large for the chunked kernel: the float stages run as PyTorch ops,
        # the kernel gates, quantizes and packs. (A two-kernel path, X P2 as a tiled
        # GEMM then P1ᵀ with the quantizer, was no faster on the H200: 250-330 µs against 256 at
        # LLaDA-8B's down site, 1024 tokens; benchmarks/results/explore-quantize-sites-h200.json.)
        x = ops.transform_reference(x, norm_weight, rms_eps, tac_m, tac_d, inv_smooth, p1, p2)
        return fused_quantize_triton(x, bits, is_masked=is_masked, gate_masked=gate_masked, gate_unmasked=gate_unmasked,
                                     pack=pack)
    if x.dtype not in _LOADABLE_DTYPES:
        x = x.float()
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    width = (k + 1) // 2 if spec.packed else k
    q = torch.empty((m, width), dtype=torch.uint8 if spec.packed else torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    zero = torch.empty((m,), dtype=torch.int32, device=x.device)
    if m > 0:
        dummy = scale  # pointer for absent operands: never read

        def arg(t):
            return t.contiguous() if t is not None else dummy

        state = dummy
        if spec.gate:
            state = is_masked.reshape(-1).contiguous().view(torch.uint8)
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        split = token_split(*spec.kron) if spec.kron is not None and _kron_tile(*spec.kron) > MAX_FUSED_KRON_TILE else None
        if split is not None:
            _launch_token_split(x2, q, scale, zero, arg(norm_weight), arg(inv_smooth), p1, p2, state,
                                arg(gate_masked), arg(gate_unmasked), spec, bits, rms_eps, split)
            return q.view(*lead, width), scale.view(*lead, 1), zero.view(*lead, 1)
        if spec.kron is not None and _kron_chunked(*spec.kron):
            _launch_chunk_kron(x2, q, scale, zero, arg(norm_weight), arg(inv_smooth), p1, p2, state,
                               arg(gate_masked), arg(gate_unmasked), spec, bits, rms_eps)
            return q.view(*lead, width), scale.view(*lead, 1), zero.view(*lead, 1)
        d1, d2, d1p, d2p, block_m = _quantize_tile(spec, m)
        by_token = spec.kron is not None and d1p * d2p > MAX_FUSED_KRON_TILE
        warps = TOKEN_KRON_WARPS if by_token else _quantize_warps(block_m * d1p * d2p)
        extra = {} if INTERPRET else {"num_warps": warps, "enable_fp_fusion": False}
        maxnreg = TOKEN_KRON_MAXNREG if by_token else QUANTIZE_MAXNREG
        if maxnreg and not INTERPRET:
            extra["maxnreg"] = maxnreg
        if by_token:
            kernel, tile = _token_kron_quantize_kernel, {"X_IS_BF16": x2.dtype == torch.bfloat16}
            parts = _presplit_parts(TOKEN_KRON_PRESPLIT, (p1, True), (p2, False))
            tile.update(zip(("p1t_hi_ptr", "p1t_lo_ptr", "p2_hi_ptr", "p2_lo_ptr"), parts or (dummy,) * 4),
                        PRESPLIT=parts is not None)
        else:
            kernel, tile = _fused_quantize_kernel, {"HAS_KRON": spec.kron is not None, "BLOCK_M": block_m}
            parts = _presplit_parts(FUSED_KRON_PRESPLIT and spec.kron is not None, (p1, False), (p2, False))
            tile.update(zip(("p1_hi_ptr", "p1_lo_ptr", "p2_hi_ptr", "p2_lo_ptr"), parts or (dummy,) * 4),
                        PRESPLIT=parts is not None)
        with _device_of(x2):
            kernel[(cdiv(m, block_m),)](
                x2, q, scale, zero,
                arg(norm_weight), arg(inv_smooth), arg(p1), arg(p2),
                state, arg(gate_masked), arg(gate_unmasked),
                m, x2.stride(0), q.stride(0), float(rms_eps) if rms_eps is not None else 0.0,
                K=k, D1=d1, D2=d2, D1P=d1p, D2P=d2p,
                QMIN=qmin, QMAX=qmax, LEVELS=float((1 << bits) - 1), PACK=spec.packed,
                HAS_NORM=spec.rms_norm, HAS_NORM_WEIGHT=spec.norm_weight,
                HAS_SMOOTH=spec.smooth, HAS_GATE=spec.gate, KRON_PRECISION=KRON_PRECISION, **tile, **extra,
            )
    return q.view(*lead, width), scale.view(*lead, 1), zero.view(*lead, 1)


def _launch_token_split(x2, q, scale, zero, norm_weight, inv_smooth, p1, p2, state, gate_masked, gate_unmasked,
                        spec, bits, rms_eps, split) -> None:
    """``_token_kron_split_kernel`` over the tokens of ``x2`` [m, K], one a program; ``split``
    from ``token_split``."""
    m, k = x2.shape
    d1, d2 = spec.kron
    split_j, ca, cb = split
    # the left factor transposed (its side unsplit), the right one as stored (its side split)
    (lf, l_size), (rf, r_size) = ((p1, d1), (p2, d2)) if split_j else ((p2, d2), (p1, d1))
    parts = _presplit_parts(TOKEN_KRON_PRESPLIT, (lf, True), (rf, False))  # kept per factor as given
    lf, rf = lf.contiguous(), rf.contiguous()  # read as stored without their splits
    extra = {} if INTERPRET else {"num_warps": TOKEN_SPLIT_WARPS, "enable_fp_fusion": False}
    maxnreg = token_split_maxnreg(max(16, next_power_of_2(l_size)) * (ca + cb))
    if maxnreg and not INTERPRET:
        extra["maxnreg"] = maxnreg
    with _device_of(x2):
        _token_kron_split_kernel[(m,)](
            x2, q, scale, zero, norm_weight, inv_smooth, lf, rf, state, gate_masked, gate_unmasked,
            m, x2.stride(0), q.stride(0), float(rms_eps) if rms_eps is not None else 0.0,
            *(parts or (lf,) * 4),
            K=k, D2=d2, R=l_size, RP=max(16, next_power_of_2(l_size)), C=r_size, CA=ca, CB=cb, SPLIT_J=split_j,
            QMIN=-(1 << (bits - 1)), QMAX=(1 << (bits - 1)) - 1, LEVELS=float((1 << bits) - 1), PACK=spec.packed,
            HAS_NORM=spec.rms_norm, HAS_NORM_WEIGHT=spec.norm_weight, HAS_SMOOTH=spec.smooth, HAS_GATE=spec.gate,
            KRON_PRECISION=KRON_PRECISION, X_IS_BF16=x2.dtype == torch.bfloat16, PRESPLIT=parts is not None, **extra,
        )


def _launch_chunk_kron(x2, q, scale, zero, norm_weight, inv_smooth, p1, p2, state, gate_masked, gate_unmasked,
                       spec, bits, rms_eps) -> None:
    """``_chunk_kron_quantize_kernel`` over the tokens of ``x2`` [m, K]: as many programs as the
    GPU holds at once (two in the interpreter, so the token loop runs), each with a float32 row
    of scratch."""
    m, k = x2.shape
    d1, d2 = spec.kron
    if INTERPRET:
        programs, extra = min(m, 2), {}
    else:
        programs = min(m, CHUNK_KRON_PROGRAMS * _multiprocessors(x2.device.index))
        extra = {"num_warps": CHUNK_KRON_WARPS, "enable_fp_fusion": False}
    scratch = torch.empty((programs, k), dtype=torch.float32, device=x2.device)
    parts = _presplit_parts(CHUNK_KRON_PRESPLIT, (p1, True), (p2, False))  # kept per factor as given
    p1, p2 = p1.contiguous(), p2.contiguous()
    presplit = parts is not None
    parts = parts or (p1,) * 4
    with _device_of(x2):
        _chunk_kron_quantize_kernel[(programs,)](
            x2, q, scale, zero, norm_weight, inv_smooth, p1, p2, state, gate_masked, gate_unmasked, scratch, *parts,
            m, x2.stride(0), q.stride(0), float(rms_eps) if rms_eps is not None else 0.0,
            K=k, D1=d1, D2=d2, D1P=max(16, next_power_of_2(d1)), CH=KRON_CHUNK, NCH=cdiv(d2, KRON_CHUNK),
            QMIN=-(1 << (bits - 1)), QMAX=(1 << (bits - 1)) - 1, LEVELS=float((1 << bits) - 1), PACK=spec.packed,
            HAS_NORM=spec.rms_norm, HAS_NORM_WEIGHT=spec.norm_weight, HAS_SMOOTH=spec.smooth, HAS_GATE=spec.gate,
            KRON_PRECISION=KRON_PRECISION, X_IS_BF16=x2.dtype == torch.bfloat16, PRESPLIT=presplit, **extra,
        )


_SPLITS: dict[int, tuple] = {}  # id(factor) -> (weak reference, {(version, transpose): (hi, lo)})
# launches of the Kronecker kernels with the factors split ahead ("presplit") or in the kernel
# because no split was made for the CUDA factor ("split in kernel"): for probes and benchmarks
PRESPLIT_LAUNCHES: collections.Counter = collections.Counter()


def _bf16_split(factor: torch.Tensor, transpose: bool = False, make: bool = True):
    """A Kronecker factor (or its transpose, contiguous) as bfloat16 ``(hi, lo)`` with
    ``hi + lo`` its value to 16 significant bits, both rounded to nearest even (as the kernels'
    ``_bf16_parts``). Kept per factor tensor and version while the factor lives; with ``make``
    False, None unless it was made before. (Keyed by id with a weak reference: a
    WeakKeyDictionary would compare tensors with ``==``.)"""
    key = (factor._version, transpose)
    entry = _SPLITS.get(id(factor))
    if entry is not None and entry[0]() is factor and key in entry[1]:
        return entry[1][key]
    if not make:
        return None
    if entry is None or entry[0]() is not factor:
        entry = (weakref.ref(factor), {})
        _SPLITS[id(factor)] = entry
        weakref.finalize(factor, _SPLITS.pop, id(factor), None)
    f = (factor.t() if transpose else factor).float().contiguous()
    hi = f.to(torch.bfloat16)
    entry[1][key] = (hi, (f - hi.float()).to(torch.bfloat16))
    return entry[1][key]


def prepare_factor_splits(*factors: torch.Tensor) -> None:
    """Make the bfloat16 splits of Kronecker factors (as stored and transposed) ahead of their
    first launch. The fusion pass calls it at compile time for CUDA factors: at run time a CUDA
    factor without its split is split in the kernel instead, never here, because under CUDA
    graphs the first call is a warm-up that allocates in the graph's memory pool, and Inductor's
    CUDA-graph trees refuse memory left there that is not an output."""
    for factor in factors:
        for transpose in (False, True):
            _bf16_split(factor, transpose)


def _presplit_parts(wanted: bool, *factors: tuple) -> Optional[tuple]:
    """(hi, lo, hi, lo, ...) of ``(factor, transposed)`` pairs, or None: not ``wanted``, a
    precision other than bf16x3, or a CUDA factor whose split was not made ahead
    (``prepare_factor_splits``). CPU factors (the interpreter) are split here."""
    if not wanted or KRON_PRECISION != "bf16x3":
        return None
    parts = [_bf16_split(f, t, make=not f.is_cuda) for f, t in factors]
    if any(p is None for p in parts):
        PRESPLIT_LAUNCHES["split in kernel"] += 1
        return None
    PRESPLIT_LAUNCHES["presplit"] += 1
    return tuple(t for pair in parts for t in pair)


# ----------------------------------------------------------------------------------------------
# The GEMM: int8 / packed int4 operands, int32 accumulation, fused epilogue


@triton.jit
def _k_planes(ptrs, k_idx, K, KB, PACKED: tl.constexpr, EVEN_K: tl.constexpr, stride_k):
    """(even-k codes, odd-k codes) of one K step of the weight, as int8 [HALF, BLOCK_N] tiles.
    ``k_idx`` is the pair index j (codes 2j, 2j + 1): packed, one byte; unpacked, two loads."""
    if PACKED:
        if EVEN_K:
            b = tl.load(ptrs)
        else:
            b = tl.load(ptrs, mask=k_idx < KB, other=0)
        b = b.to(tl.int8, bitcast=True)
        return (b << 4) >> 4, b >> 4
    else:
        if EVEN_K:
            even = tl.load(ptrs)
            odd = tl.load(ptrs + stride_k)
        else:
            even = tl.load(ptrs, mask=2 * k_idx < K, other=0)
            odd = tl.load(ptrs + stride_k, mask=2 * k_idx + 1 < K, other=0)
        return even, odd


@triton.jit
def _a_planes(ptrs, k_idx, K, KB, PACKED: tl.constexpr, EVEN_K: tl.constexpr,
              BLOCK_M: tl.constexpr, HALF: tl.constexpr):
    """(even-k codes, odd-k codes) of one K step of the activation, as int8 [BLOCK_M, HALF]
    tiles. Packed: [BLOCK_M, HALF] bytes; unpacked: a contiguous [BLOCK_M, 2·HALF] tile split
    into its even and odd columns in registers (``k_idx`` is then the code index)."""
    if PACKED:
        if EVEN_K:
            b = tl.load(ptrs)
        else:
            b = tl.load(ptrs, mask=k_idx < KB, other=0)
        b = b.to(tl.int8, bitcast=True)
        return (b << 4) >> 4, b >> 4
    else:
        if EVEN_K:
            a = tl.load(ptrs)
        else:
            a = tl.load(ptrs, mask=k_idx < K, other=0)
        return tl.split(tl.reshape(a, (BLOCK_M, HALF, 2)))


@triton.jit
def _epilogue_tile(acc, x_zero, x_scale, w_ptrs_n, w_sum_ptr, w_scale_ptr, bias_ptr, n_ok, HAS_BIAS: tl.constexpr):
    w_sum = tl.load(w_sum_ptr + w_ptrs_n, mask=n_ok, other=0)
    acc = acc - x_zero[:, None] * w_sum[None, :]
    w_scale = tl.load(w_scale_ptr + w_ptrs_n, mask=n_ok, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]  # (acc * x_scale) * w_scale
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + w_ptrs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _bfloat16_bits_rne(y):
    """float32 -> bfloat16 bit pattern (int16), rounding to nearest even (the interpreter truncates)."""
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    bits = tl.where(y != y, 0x7FC0, bits)  # noqa: PLR0124 (NaN -> quiet NaN)
    return bits.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _fused_linear_kernel_body(
    a_ptr, b_ptr, x_scale_ptr, x_zero_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, res_ptr, y_ptr,
    M, N, K, KB,
    stride_am, stride_ak, stride_bn, stride_bk, stride_rm, stride_ym,
    A_PACKED: tl.constexpr, B_PACKED: tl.constexpr, HAS_BIAS: tl.constexpr,
    SWIGLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BF16_BITS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # N is the output width (half the weight rows with SwiGLU).
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_rows = (offs_m % M).to(tl.int64)  # past the edge: re-read valid rows, masked at the store
    b_rows = (offs_n % N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    up_offset = N * stride_bn
    HALF: tl.constexpr = BLOCK_K // 2  # a K step of BLOCK_K codes: BLOCK_K // 2 pairs (packed bytes)

    if A_PACKED or B_PACKED:
        offs_j = tl.arange(0, HALF)
        A_WIDTH: tl.constexpr = HALF if A_PACKED else BLOCK_K  # bytes or codes of A a step
        offs_a = tl.arange(0, A_WIDTH)
        b_step = stride_bk if B_PACKED else 2 * stride_bk
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_a[None, :] * stride_ak
        b_ptrs = b_ptr + b_rows[None, :] * stride_bn + offs_j[:, None] * b_step  # [HALF, BLOCK_N]
        for kb in range(tl.cdiv(KB, HALF)):
            k_a = kb * A_WIDTH + offs_a[None, :]
            j_b = kb * HALF + offs_j[:, None]
            a_even, a_odd = _a_planes(a_ptrs, k_a, K, KB, A_PACKED, EVEN_K, BLOCK_M, HALF)
            b_even, b_odd = _k_planes(b_ptrs, j_b, K, KB, B_PACKED, EVEN_K, stride_bk)
            acc = tl.dot(a_even, b_even, acc, out_dtype=tl.int32)
            acc = tl.dot(a_odd, b_odd, acc, out_dtype=tl.int32)
            if SWIGLU:
                u_even, u_odd = _k_planes(b_ptrs + up_offset, j_b, K, KB, B_PACKED, EVEN_K, stride_bk)
                acc_up = tl.dot(a_even, u_even, acc_up, out_dtype=tl.int32)
                acc_up = tl.dot(a_odd, u_odd, acc_up, out_dtype=tl.int32)
            a_ptrs += A_WIDTH * stride_ak
            b_ptrs += HALF * b_step
    else:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + b_rows[None, :] * stride_bn + offs_k[:, None] * stride_bk
        for k in range(tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            if SWIGLU:
                if EVEN_K:
                    u = tl.load(b_ptrs + up_offset)
                else:
                    u = tl.load(b_ptrs + up_offset, mask=offs_k[:, None] < k_left, other=0)
                acc_up = tl.dot(a, u, acc_up, out_dtype=tl.int32)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

    m_ok = offs_m < M
    n_ok = offs_n < N
    x_zero = tl.load(x_zero_ptr + offs_m, mask=m_ok, other=0)
    x_scale = tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)
    y = _epilogue_tile(acc, x_zero, x_scale, offs_n, w_sum_ptr, w_scale_ptr, bias_ptr, n_ok, HAS_BIAS)
    if SWIGLU:
        up = _epilogue_tile(acc_up, x_zero, x_scale, offs_n + N, w_sum_ptr, w_scale_ptr, bias_ptr, n_ok, HAS_BIAS)
        sig = tl.math.div_rn(tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32), 1.0 + tl.exp(-y))
        y = (y * sig) * up
    out_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        r_ptrs = res_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
        y = y + tl.load(r_ptrs, mask=out_ok, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if BF16_BITS:
        y = _bfloat16_bits_rne(y)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=out_ok)


# Packed bytes -> (low-nibble codes, high-nibble codes) as int8, four bytes a 32-bit register
# (see _nibble_planes); also run by the Gluon kernel (gluon_w4.py). A constexpr: kernels read it.
SWAR_NIBBLES_ASM = tl.constexpr("""{
            .reg .b32 t, u;
            and.b32 t, $2, 0x0f0f0f0f;
            xor.b32 t, t, 0x88888888;
            sub.u32 t, t, 0x08080808;
            xor.b32 $0, t, 0x80808080;
            shr.u32 u, $2, 4;
            and.b32 u, u, 0x0f0f0f0f;
            xor.b32 u, u, 0x88888888;
            sub.u32 u, u, 0x08080808;
            xor.b32 $1, u, 0x80808080;
            }""")


@triton.jit
def _nibble_planes(wb, SWAR: tl.constexpr):
    """Packed bytes (uint8) -> (low-nibble codes, high-nibble codes), int8 in [-8, 7].

    ``SWAR`` (GPU): four bytes per 32-bit register (``pack=4``) handled at once: ``t = nibble ^ 8``
    lies in [0, 15], and ``((t | 0x80) - 8) ^ 0x80`` is ``t - 8`` in every byte with no borrow
    between lanes (each lane holds 120..135 before the last xor). Five and four ALU operations per
    eight codes, against two shifts per code; it halves the W4 GEMM's time on the H200
    (``benchmarks/explore/w4_gemm_swapped.py``). The interpreter cannot run PTX: plain shifts."""
    if SWAR:
        lo, hi = tl.inline_asm_elementwise(
            asm=SWAR_NIBBLES_ASM,
            constraints="=r,=r,r",
            args=[wb],
            dtype=(tl.int8, tl.int8),
            is_pure=True,
            pack=4,
        )
        return lo, hi
    else:
        b = wb.to(tl.int8, bitcast=True)
        return (b << 4) >> 4, b >> 4


@triton.jit
def _w4_weight_planes(w_ptrs, j, KB, EVEN_K: tl.constexpr, SWAR: tl.constexpr):
    """One K step of the packed weight's bytes [BLOCK_N, HALF] as its two nibble planes."""
    if EVEN_K:
        wb = tl.load(w_ptrs)
    else:
        wb = tl.load(w_ptrs, mask=j < KB, other=0)
    return _nibble_planes(wb, SWAR)


@triton.jit
def _w4_weight_tile(w_ptrs, j, KB, EVEN_K: tl.constexpr, SWAR: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K step of the pair-packed weight as int8 codes [BLOCK_N, BLOCK_K] in K order (registers)."""
    lo, hi = _w4_weight_planes(w_ptrs, j, KB, EVEN_K, SWAR)
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))


@triton.jit
def _w4_activation_tile(a_ptrs, k, K, EVEN_K: tl.constexpr):
    """Activation codes [rows of K, BLOCK_M] at K indices ``k`` (zero past K)."""
    if EVEN_K:
        return tl.load(a_ptrs)
    return tl.load(a_ptrs, mask=k < K, other=0)


@triton.jit
def _w4_linear_kernel_body(
    a_ptr, b_ptr, x_scale_ptr, x_zero_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, res_ptr, y_ptr,
    M, N, K, KB,
    stride_am, stride_bn, stride_rm, stride_ym,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BF16_BITS: tl.constexpr,
    EVEN_K: tl.constexpr, SWAR: tl.constexpr, BLOCKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """Packed 4-bit weight × int8 activation codes, computed transposed: ``Yᵀ = W Xᵀ``.

    The weight tile is unpacked in registers and is the MMA's first operand, which wgmma reads
    from registers; the activation tile goes global -> shared memory -> the MMA untouched. So no
    unpacked operand makes a round trip through shared memory (the ``_fused_linear_kernel``
    layout, with the weight second, must store it there). Accumulator and epilogue are
    [BLOCK_N, BLOCK_M]; the tile is transposed once for the store."""
    # grouped over weight tiles: GROUP_N of them share each activation tile while it is in L2
    pid_n, pid_m = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    w_rows = (offs_n % N).to(tl.int64)  # past the edge: re-read valid rows, masked at the store
    a_rows = (offs_m % M).to(tl.int64)
    HALF: tl.constexpr = BLOCK_K // 2
    offs_j = tl.arange(0, HALF)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = b_ptr + w_rows[:, None] * stride_bn + offs_j[None, :]  # [BLOCK_N, HALF] bytes
    if BLOCKED:
        a_ptrs = a_ptr + a_rows[None, :] * stride_am + offs_j[:, None]  # [HALF, BLOCK_M] codes, each half
    else:
        a_ptrs = a_ptr + a_rows[None, :] * stride_am + offs_k[:, None]  # [BLOCK_K, BLOCK_M] codes
    up_offset = N * stride_bn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for kb in range(tl.cdiv(KB, HALF)):
        j = kb * HALF + offs_j[None, :]
        if BLOCKED:
            # the blocked layout (fused_ops.pack_int4_blocks, BLOCK_K = 128): the nibble planes are
            # the two K halves of the step, each multiplied with its half of the activation tile
            a_lo = _w4_activation_tile(a_ptrs, kb * BLOCK_K + offs_j[:, None], K, EVEN_K)
            a_hi = _w4_activation_tile(a_ptrs + HALF, kb * BLOCK_K + HALF + offs_j[:, None], K, EVEN_K)
            lo, hi = _w4_weight_planes(w_ptrs, j, KB, EVEN_K, SWAR)
            acc = tl.dot(hi, a_hi, tl.dot(lo, a_lo, acc, out_dtype=tl.int32), out_dtype=tl.int32)
            if SWIGLU:
                lo, hi = _w4_weight_planes(w_ptrs + up_offset, j, KB, EVEN_K, SWAR)
                acc_up = tl.dot(hi, a_hi, tl.dot(lo, a_lo, acc_up, out_dtype=tl.int32), out_dtype=tl.int32)
        else:
            a = _w4_activation_tile(a_ptrs, kb * BLOCK_K + offs_k[:, None], K, EVEN_K)
            w = _w4_weight_tile(w_ptrs, j, KB, EVEN_K, SWAR, BLOCK_N, BLOCK_K)
            acc = tl.dot(w, a, acc, out_dtype=tl.int32)
            if SWIGLU:
                u = _w4_weight_tile(w_ptrs + up_offset, j, KB, EVEN_K, SWAR, BLOCK_N, BLOCK_K)
                acc_up = tl.dot(u, a, acc_up, out_dtype=tl.int32)
        w_ptrs += HALF
        a_ptrs += BLOCK_K

    m_ok = offs_m < M
    n_ok = offs_n < N
    x_zero = tl.load(x_zero_ptr + offs_m, mask=m_ok, other=0)
    x_scale = tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)
    # the same float32 operations in the same order as _epilogue_tile, on the transposed tile
    y = _epilogue_tile(tl.trans(acc), x_zero, x_scale, offs_n, w_sum_ptr, w_scale_ptr, bias_ptr, n_ok, HAS_BIAS)
    if SWIGLU:
        up = _epilogue_tile(tl.trans(acc_up), x_zero, x_scale, offs_n + N, w_sum_ptr, w_scale_ptr, bias_ptr, n_ok, HAS_BIAS)
        sig = tl.math.div_rn(tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32), 1.0 + tl.exp(-y))
        y = (y * sig) * up
    out_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        r_ptrs = res_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
        y = y + tl.load(r_ptrs, mask=out_ok, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if BF16_BITS:
        y = _bfloat16_bits_rne(y)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=out_ok)


def _even_k(args) -> bool:
    if args["A_PACKED"] or args["B_PACKED"]:
        # every pair step whole, and an unpacked operand's odd column always inside K
        return args["KB"] % (args["BLOCK_K"] // 2) == 0 and args["K"] == 2 * args["KB"]
    return args["K"] % args["BLOCK_K"] == 0


_EVEN_K = triton.heuristics({"EVEN_K": _even_k})


# Hopper: BLOCK_K counts codes (a packed operand moves BLOCK_K // 2 bytes a step). Compiled for
# sm_90a (python -m stq_compiler.codegen.hopper_codegen): all software-pipelined, BLOCK_M >= 64 on
# wgmma (IGMMA in SASS), narrower row tiles on mma.sync (IMMA); no register spills but ~50 bytes
# in the epilogue of the 128 x 256 tiles.
_GPU_GEMM_CONFIGS = [
    _gemm_config(128, 256, 128, 8, 3),
    _gemm_config(128, 256, 64, 8, 4),
    _gemm_config(128, 128, 128, 8, 4),
    _gemm_config(128, 128, 64, 8, 4),
    _gemm_config(64, 256, 128, 8, 3),
    _gemm_config(64, 128, 128, 4, 4),
    # for SwiGLU (two accumulators, see swiglu_fits)
    _gemm_config(128, 64, 128, 8, 4),
    _gemm_config(64, 128, 128, 8, 4),
    _gemm_config(64, 64, 128, 4, 4),
    # a few tokens (M = 1 .. 64): narrow row tiles
    _gemm_config(16, 64, 128, 4, 4),
    _gemm_config(16, 128, 128, 4, 4),
    _gemm_config(32, 128, 128, 4, 4),
    _gemm_config(32, 64, 128, 4, 4),
]


def swiglu_fits(config) -> bool:
    """SwiGLU keeps two int32 accumulators: at most 32 outputs a thread each (more spills)."""
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] <= 32 * 32 * config.num_warps


def _pruner(fits_swiglu):
    def prune(configs, named_args, **kwargs):
        """Row tiles that fit M; with SwiGLU, tiles small enough for two accumulators."""
        kept = row_tiles_fitting(configs, named_args["M"])
        if kwargs.get("SWIGLU", named_args.get("SWIGLU", False)):
            kept = [c for c in kept if fits_swiglu(c)]
        if kwargs.get("BLOCKED", named_args.get("BLOCKED", False)):  # the W4 kernel's blocked weight
            kept = [c for c in kept if c.kwargs["BLOCK_K"] == BLOCKED_STEP]
        return kept

    return prune


_prune_gemm_configs = _pruner(swiglu_fits)


# One configuration, chosen by the caller (the interpreter, tests that try every configuration).
_fused_linear_kernel_fixed = _EVEN_K(_fused_linear_kernel_body)
if INTERPRET:
    _fused_linear_kernel = _fused_linear_kernel_fixed
else:
    _fused_linear_kernel = triton.autotune(
        configs=_GPU_GEMM_CONFIGS,
        key=["M", "N", "K", "A_PACKED", "B_PACKED", "SWIGLU"],
        prune_configs_by={"early_config_prune": _prune_gemm_configs},
    )(_fused_linear_kernel_fixed)


def gemm_configs() -> list[triton.Config]:
    """The autotuned configurations on the GPU (for tests and benchmarks)."""
    return list(_GPU_GEMM_CONFIGS)


def _w4_config(block_m, block_n, block_k, num_warps, num_stages):
    return _gemm_config(block_m, block_n, block_k, num_warps, num_stages, group_key="GROUP_N")


# W4 (packed weight, int8 activation codes), transposed: BLOCK_N weight rows are the wgmma M
# side (64 a warpgroup), BLOCK_M tokens its N side (any multiple of 8, so few tokens fit well).
# The first two won every LLaDA-8B linear at 1024 and 4096 tokens on the H200 (740-815 TOP/s).
_W4_GPU_CONFIGS = [
    _w4_config(256, 128, 128, 8, 3),
    _w4_config(128, 128, 128, 4, 4),
    _w4_config(128, 128, 128, 4, 3),
    _w4_config(256, 128, 128, 8, 4),
    _w4_config(128, 256, 128, 8, 3),
    # SwiGLU (two accumulators, see w4_swiglu_fits)
    _w4_config(128, 128, 128, 8, 3),
    _w4_config(64, 128, 128, 4, 4),
    # a few tokens (M = 1 .. 64)
    _w4_config(16, 128, 128, 4, 4),
    _w4_config(32, 128, 128, 4, 4),
    _w4_config(16, 64, 256, 4, 4),
    _w4_config(32, 64, 128, 4, 4),
]


def w4_swiglu_fits(config) -> bool:
    """SwiGLU keeps two int32 accumulators: at most 64 outputs of each a thread."""
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] <= 64 * 32 * config.num_warps


_prune_w4_configs = _pruner(w4_swiglu_fits)


def _w4_even_k(args) -> bool:
    return args["KB"] % (args["BLOCK_K"] // 2) == 0 and args["K"] == 2 * args["KB"]


_w4_linear_kernel_fixed = triton.heuristics({"EVEN_K": _w4_even_k})(_w4_linear_kernel_body)
if INTERPRET:
    _w4_linear_kernel = _w4_linear_kernel_fixed
else:
    _w4_linear_kernel = triton.autotune(
        configs=_W4_GPU_CONFIGS,
        key=["M", "N", "K", "SWIGLU", "BLOCKED"],
        prune_configs_by={"early_config_prune": _prune_w4_configs},
    )(_w4_linear_kernel_fixed)

# the interpreter's one configuration (large blocks: each program costs milliseconds there)
_W4_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_N": 4}


# a blocked weight (fused_ops.pack_int4_blocks) is read one 128-code block a K step
BLOCKED_STEP = 128


def w4_gemm_configs() -> list[triton.Config]:
    """The autotuned configurations of the W4 kernel on the GPU (for tests and benchmarks)."""
    return list(_W4_GPU_CONFIGS)


def fused_linear_triton(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, residual, swiglu, out_dtype, config=None):
    """``stq::fused_linear`` in Triton (see the module docstring). ``config``: a ``triton.Config``
    to run instead of autotuning (GPU only)."""
    ops = _ops()
    ops._check_fused_linear_args(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, residual, swiglu)
    k = ops.linear_in_features(xq, wq)
    lead, width = xq.shape[:-1], xq.shape[-1]
    a = xq.reshape(-1, width)
    if a.stride(-1) != 1:
        a = a.contiguous()
    blocked = wq.dim() == 3  # fused_ops.pack_int4_blocks: [N, blocks, 64] read as [N, blocks·64] bytes
    if wq.stride(-1) != 1 or blocked:
        wq = wq.contiguous().reshape(wq.shape[0], -1)
    m = a.shape[0]
    n = wq.shape[0] // 2 if swiglu else wq.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    bf16_bits = INTERPRET and out_dtype == torch.bfloat16
    if m > 0 and n > 0:
        x_scale, x_zero = x_scale.reshape(-1).contiguous(), x_zero.reshape(-1).contiguous()
        w_scale, w_sum = w_scale.contiguous(), w_sum.contiguous()
        bias_arg = bias.contiguous() if bias is not None else w_scale
        res = residual.reshape(m, n) if residual is not None else None
        if res is not None and res.stride(-1) != 1:
            res = res.contiguous()
        res_arg = res if res is not None else w_scale
        y_arg = y.view(torch.int16) if bf16_bits else y
        a_packed, b_packed = a.dtype == torch.uint8, wq.dtype == torch.uint8
        args = (
            a, wq, x_scale, x_zero, w_scale, w_sum, bias_arg, res_arg, y_arg,
            m, n, k, wq.shape[1] if blocked else (k + 1) // 2,
            a.stride(0), a.stride(1), wq.stride(0), wq.stride(1),
            res.stride(0) if res is not None else 0, y.stride(0),
        )
        flags = {"A_PACKED": a_packed, "B_PACKED": b_packed, "HAS_BIAS": bias is not None,
                 "SWIGLU": swiglu, "HAS_RESIDUAL": residual is not None, "BF16_BITS": bf16_bits}

        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)

        if b_packed and not a_packed:
            _launch_w4(args, {**flags, "BLOCKED": blocked}, grid, config)
            return y.view(*lead, n)
        with _device_of(a):
            if INTERPRET:
                _fused_linear_kernel[grid](*args, **flags, **_INTERPRET_GEMM_CONFIG)
            elif config is not None:
                _fused_linear_kernel_fixed[grid](
                    *args, **flags, **config.kwargs, num_warps=config.num_warps,
                    num_stages=config.num_stages, enable_fp_fusion=False,
                )
            else:
                _fused_linear_kernel[grid](*args, **flags, enable_fp_fusion=False)
    return y.view(*lead, n)


def _launch_w4(args, flags, grid, config) -> None:
    """The transposed W4 kernel for a packed weight and int8 activation codes (W4A4 with the
    activation codes one a byte, W4A8): on Hopper, when TMA can read the operands and no
    ``config`` is forced, the Gluon kernel (``gluon_w4``), which keeps the MMA in flight while it
    unpacks the next tile; else ``_w4_linear_kernel``."""
    (a, wq, x_scale, x_zero, w_scale, w_sum, bias_arg, res_arg, y_arg, m, n, k, kb,
     stride_am, _, stride_bn, _, stride_rm, stride_ym) = args
    if config is None and not INTERPRET:
        from stq_compiler.codegen import gluon_w4

        if gluon_w4.supports(a, wq):
            with _device_of(a):
                gluon_w4.w4_linear_gluon(a, wq, x_scale, x_zero, w_scale, w_sum,
                                         bias_arg if flags["HAS_BIAS"] else None,
                                         res_arg if flags["HAS_RESIDUAL"] else None, y_arg, k,
                                         blocked=flags["BLOCKED"], swiglu=flags["SWIGLU"])
            return
    w4_args = (a, wq, x_scale, x_zero, w_scale, w_sum, bias_arg, res_arg, y_arg, m, n, k, kb,
               stride_am, stride_bn, stride_rm, stride_ym)
    w4_flags = {key: flags[key] for key in ("HAS_BIAS", "SWIGLU", "HAS_RESIDUAL", "BF16_BITS", "BLOCKED")}
    w4_flags["SWAR"] = not INTERPRET
    if config is not None and flags["BLOCKED"] and config.kwargs["BLOCK_K"] != BLOCKED_STEP:
        raise ValueError(f"a blocked 4-bit weight is read {BLOCKED_STEP} codes a step, not BLOCK_K={config.kwargs['BLOCK_K']}")
    with _device_of(a):
        if INTERPRET:
            block_k = BLOCKED_STEP if flags["BLOCKED"] else _W4_INTERPRET_CONFIG["BLOCK_K"]
            _w4_linear_kernel[grid](*w4_args, **w4_flags, **{**_W4_INTERPRET_CONFIG, "BLOCK_K": block_k})
        elif config is not None:
            _w4_linear_kernel_fixed[grid](
                *w4_args, **w4_flags, **config.kwargs, num_warps=config.num_warps,
                num_stages=config.num_stages, enable_fp_fusion=False,
            )
        else:
            _w4_linear_kernel[grid](*w4_args, **w4_flags, enable_fp_fusion=False)


# ----------------------------------------------------------------------------------------------
# Registration and inspection

_registered = False


def register_cuda_kernels() -> None:
    """Make ``stq::fused_quantize`` and ``stq::fused_linear`` run these kernels on CUDA
    (registered with the dispatcher directly: ``dispatch.register_cuda``)."""
    global _registered
    if _registered:
        return
    ops = _ops()
    register_cuda(ops.fused_quantize, _fused_quantize_cuda)
    register_cuda(ops.fused_linear, _fused_linear_cuda)
    _registered = True


def _fused_quantize_cuda(x, bits, norm_weight=None, rms_eps=None, tac_m=None, tac_d=None, inv_smooth=None,
                         p1=None, p2=None, is_masked=None, gate_masked=None, gate_unmasked=None, pack=True):
    return fused_quantize_triton(x, bits, norm_weight, rms_eps, tac_m, tac_d, inv_smooth, p1, p2,
                                 is_masked, gate_masked, gate_unmasked, pack)


def _fused_linear_cuda(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, residual, swiglu, out_dtype):
    return fused_linear_triton(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, residual, swiglu, out_dtype)


def kernel_sources() -> dict[str, str]:
    """The Triton source of each kernel, by name (for inspection and dumps)."""
    kernels = (_normalised, _bf16_rounded, _bf16_parts, _bf16_pair, _bf16_dot, _bf16x3_acc, _dot_f32_split_b, _dot_f32, _times_factor, _quantize_store,
               _store_codes, _fused_quantize_kernel, _norm_smooth, _token_kron_quantize_kernel, _token_kron_split_kernel,
               _factor_block, _factor_parts, _store_token_codes, _chunk_token_rows, _chunk_kron_quantize_kernel, _tac_affine_kernel,
               _a_planes, _k_planes, _epilogue_tile, _bfloat16_bits_rne, _fused_linear_kernel_body, _nibble_planes,
               _w4_weight_planes, _w4_weight_tile, _w4_activation_tile, _w4_linear_kernel_body)
    sources = {}
    for kernel in kernels:
        fn = kernel
        while hasattr(fn, "fn"):
            fn = fn.fn
        sources[fn.__name__] = textwrap.dedent(inspect.getsource(fn))
    return sources
