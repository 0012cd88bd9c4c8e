"""Probe (GPU): the MLP down site, a quarter of a W4A4 block on the H200 (256 µs of ~1077 at
LLaDA-8B, 1024 tokens; README "Speed").

Until 2026-11-29 production ran the site's Kronecker ``P1ᵀ X P2`` (96 x 128 factors: a padded
token does not fit ``_fused_quantize_kernel``'s multi-token tile) as PyTorch float32 matmuls (FFMA,
~175 µs), then ``_fused_quantize_kernel`` gated and quantized with one token a program (16 warps,
~80 µs for a 50 MB read): the ``torch`` rows below. Candidates:

* ``token kernel``: ``_token_kron_quantize_kernel``, one token a program, ``P1ᵀ (X P2)`` as two
  [128, 128] dots (the 96 rows padded) on the token held in registers, then gate and quantize;
  tf32x3 or bf16x3 (``triton_fused._dot_f32``), 8 warps. Production since 2026-11-29 (bf16x3).

* ``split-quantize``: the same Kronecker, then gate + quantize as two launches over (token,
  chunk) programs: partial min/max per chunk, then each chunk reads its token's partials, forms
  the scale and zero point exactly as the reference does, and quantizes. Many small programs
  instead of one long one per token; the float32 input is read twice.
* ``chunk kernel``: ``_chunk_kron_quantize_kernel`` (production for Dream-7B's 128 x 148 since
  2026-11-29, session 7), as many programs as the GPU holds, each looping over tokens: per token
  ``Y = P1ᵀ (X P2)`` ``ch`` columns at a time, the gated chunks stored to the program's float32
  scratch row (L2) while min and max accumulate, then read back and quantized.
* ``i-major``: the Kronecker as two tiled tf32x3 GEMMs, ``X P2`` written as [i, token, j] so that
  ``P1ᵀ ·`` is one GEMM [d1, d1] x [d1, tokens·d2] (no per-token programs, no transposes), then
  the split quantizer reading each token's [d1, d2] tile with the row stride tokens·d2.

Each is checked against ``fused_ops.fused_quantize_reference`` (the criterion of the CUDA tests)
and timed with ``do_bench_cudagraph``, at LLaDA-8B's and Dream-7B's down sites.

    python benchmarks/explore/down_site.py --out $OUT/down-site.json
    TRITON_INTERPRET=1 python benchmarks/explore/down_site.py --check-only   # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_loop import check_and_time  # noqa: E402

from stq_compiler import fused_ops  # noqa: E402
from stq_compiler.codegen import triton_fused  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gated_chunk(x_ptr, t, c, c_ok, is_masked_ptr, gate_m_ptr, gate_u_ptr, STRIDE_T, STRIDE_I,
                 D2: tl.constexpr, HAS_GATE: tl.constexpr):
    """Features ``c`` of token ``t``, float32, gated; feature i·d2 + j sits at i·STRIDE_I + t·STRIDE_T + j."""
    x = tl.load(x_ptr + (c // D2).to(tl.int64) * STRIDE_I + t.to(tl.int64) * STRIDE_T + c % D2, mask=c_ok, other=0.0)
    x = x.to(tl.float32)
    if HAS_GATE:
        masked = tl.load(is_masked_ptr + t) != 0
        g = tl.where(masked, tl.load(gate_m_ptr + c, mask=c_ok, other=0.0), tl.load(gate_u_ptr + c, mask=c_ok, other=0.0))
        x = x * g.to(tl.float32)
    return tl.where(c_ok, x, 0.0)


@triton.jit
def _chunk_minmax_kernel(x_ptr, lo_ptr, hi_ptr, is_masked_ptr, gate_m_ptr, gate_u_ptr, K, STRIDE_T, STRIDE_I,
                         D2: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, HAS_GATE: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    c_ok = c < K
    x = _gated_chunk(x_ptr, t, c, c_ok, is_masked_ptr, gate_m_ptr, gate_u_ptr, STRIDE_T, STRIDE_I, D2, HAS_GATE)
    tl.store(lo_ptr + t * N_CHUNKS + tl.program_id(1), tl.min(x, axis=0))
    tl.store(hi_ptr + t * N_CHUNKS + tl.program_id(1), tl.max(x, axis=0))


@triton.jit
def _chunk_quantize_kernel(x_ptr, lo_ptr, hi_ptr, q_ptr, scale_ptr, zero_ptr, is_masked_ptr, gate_m_ptr, gate_u_ptr,
                           K, STRIDE_T, STRIDE_I, stride_qm, D2: tl.constexpr, CHUNK: tl.constexpr,
                           N_CHUNKS: tl.constexpr, NCP: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                           LEVELS: tl.constexpr, HAS_GATE: tl.constexpr):
    t = tl.program_id(0)
    parts = tl.arange(0, NCP)
    part_ok = parts < N_CHUNKS
    # min/max are exact, so combining the partials gives the reference's lo and hi bit for bit
    lo = tl.minimum(tl.min(tl.load(lo_ptr + t * N_CHUNKS + parts, mask=part_ok, other=0.0), axis=0), 0.0)
    hi = tl.maximum(tl.max(tl.load(hi_ptr + t * N_CHUNKS + parts, mask=part_ok, other=0.0), axis=0), 0.0)
    scale = tl.math.div_rn(hi - lo, LEVELS * 1.0)
    scale = tl.where(scale > 0, scale, 1.0)
    zero = QMIN - tl.floor(tl.math.div_rn(lo, scale) + 0.5)
    if tl.program_id(1) == 0:
        tl.store(scale_ptr + t, scale)
        tl.store(zero_ptr + t, zero.to(tl.int32))
    c = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    c_ok = c < K
    x = _gated_chunk(x_ptr, t, c, c_ok, is_masked_ptr, gate_m_ptr, gate_u_ptr, STRIDE_T, STRIDE_I, D2, HAS_GATE)
    q = tl.floor(tl.math.div_rn(x, tl.zeros([CHUNK], dtype=tl.float32) + scale) + 0.5) + zero
    q = tl.minimum(tl.maximum(q, QMIN), QMAX)
    tl.store(q_ptr + t.to(tl.int64) * stride_qm + c, q.to(tl.int8), mask=c_ok)


def split_quantize(y, m, k, d2, stride_t, stride_i, bits, is_masked, gate_masked, gate_unmasked, chunk):
    """Gate + per-token quantize (4-bit codes one a byte) of ``m`` tokens laid out by the strides."""
    n_chunks = triton.cdiv(k, chunk)
    lo = torch.empty((m, n_chunks), dtype=torch.float32, device=y.device)
    hi = torch.empty_like(lo)
    q = torch.empty((m, k), dtype=torch.int8, device=y.device)
    scale = torch.empty((m,), dtype=torch.float32, device=y.device)
    zero = torch.empty((m,), dtype=torch.int32, device=y.device)
    state = is_masked.reshape(-1).contiguous().view(torch.uint8)
    common = dict(D2=d2, CHUNK=chunk, N_CHUNKS=n_chunks, HAS_GATE=True)
    extra = {} if INTERPRET else {"num_warps": 4, "enable_fp_fusion": False}
    _chunk_minmax_kernel[(m, n_chunks)](y, lo, hi, state, gate_masked, gate_unmasked, k, stride_t, stride_i, **common, **extra)
    _chunk_quantize_kernel[(m, n_chunks)](
        y, lo, hi, q, scale, zero, state, gate_masked, gate_unmasked, k, stride_t, stride_i, q.stride(0),
        NCP=triton.next_power_of_2(n_chunks), QMIN=-(1 << (bits - 1)), QMAX=(1 << (bits - 1)) - 1,
        LEVELS=float((1 << bits) - 1), **common, **extra,
    )
    return q, scale.view(m, 1), zero.view(m, 1)


@triton.jit
def _right_imajor_kernel(x_ptr, p2_ptr, y_ptr, M, D1: tl.constexpr, D2: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Y1 = X P2 on the [tokens·d1, d2] view (row r: token r // d1, row r % d1), stored [i, token, j]."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < M * D1
    t, i = r // D1, r % D1
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D2
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D2, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D2
        a = tl.load(x_ptr + r.to(tl.int64)[:, None] * D2 + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(p2_ptr + k[:, None] * D2 + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    out = y_ptr + i.to(tl.int64)[:, None] * (M * D2) + t.to(tl.int64)[:, None] * D2 + n[None, :]
    tl.store(out, acc, mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def _left_gemm_kernel(p1_ptr, y1_ptr, y_ptr, N, D1: tl.constexpr,
                      BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Y = P1ᵀ Y1 with Y1 as [d1, N = tokens·d2]: one GEMM, float32 out in the same layout."""
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok, n_ok = i < D1, n < N
    acc = tl.zeros([BLOCK_I, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D1, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D1
        a = tl.load(p1_ptr + k[None, :] * D1 + i[:, None], mask=i_ok[:, None] & k_ok[None, :], other=0.0)  # P1ᵀ[i, k]
        b = tl.load(y1_ptr + k.to(tl.int64)[:, None] * N + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a.to(tl.float32), b, acc, input_precision=PRECISION)
    tl.store(y_ptr + i.to(tl.int64)[:, None] * N + n[None, :], acc, mask=i_ok[:, None] & n_ok[None, :])


def imajor_kronecker(x, p1, p2, right=(128, 64, 32, 4, 3), left=(64, 128, 32, 4, 3)):
    """``P1ᵀ X P2`` per token as two GEMMs; float32 [d1, tokens, d2]."""
    m, k = x.shape
    d1, d2 = p1.shape[0], p2.shape[0]
    y1 = torch.empty((d1, m, d2), dtype=torch.float32, device=x.device)
    y = torch.empty_like(y1)
    precision = "tf32x3"  # as measured (tl.dot's own; production's bf16x3 is triton_fused._dot_f32)
    if INTERPRET:
        right, left = (32, 16, 16, 4, 1), (16, 32, 16, 4, 1)
    br, bn, bk, warps, stages = right
    extra = {} if INTERPRET else {"num_warps": warps, "num_stages": stages}
    _right_imajor_kernel[(triton.cdiv(m * d1, br), triton.cdiv(d2, bn))](
        x, p2.contiguous(), y1, m, D1=d1, D2=d2, BLOCK_R=br, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, **extra)
    bi, bn, bk, warps, stages = left
    extra = {} if INTERPRET else {"num_warps": warps, "num_stages": stages}
    _left_gemm_kernel[(triton.cdiv(d1, bi), triton.cdiv(m * d2, bn))](
        p1.contiguous(), y1, y, m * d2, D1=d1, BLOCK_I=bi, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, **extra)
    return y


def site_inputs(m, kron, device, seed=0):
    d1, d2 = kron
    k = d1 * d2
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=gen)
    x[:, torch.randint(0, k, (8,), device=device, generator=gen)] *= 30.0
    x = x.bfloat16()
    p1 = torch.linalg.qr(torch.randn(d1, d1, device=device, generator=gen))[0].contiguous()
    p2 = torch.linalg.qr(torch.randn(d2, d2, device=device, generator=gen))[0].contiguous()
    private = max(1, k // 32)
    gm, gu = torch.ones(k, device=device), torch.ones(k, device=device)
    gm[k - private:] = 0.0
    gu[k - 2 * private: k - private] = 0.0
    is_masked = torch.rand(m, device=device, generator=gen) < 0.5
    return x, dict(p1=p1, p2=p2, is_masked=is_masked, gate_masked=gm, gate_unmasked=gu)


def candidates(x, kw, chunk):
    m, k = x.shape
    d2 = kw["p2"].shape[0]
    gates = (kw["is_masked"], kw["gate_masked"], kw["gate_unmasked"])

    def production():
        return triton_fused.fused_quantize_triton(x, 4, **kw, pack=False)

    def patched(**settings):
        def run():
            saved = {name: getattr(triton_fused, name) for name in settings}
            for name, value in settings.items():
                setattr(triton_fused, name, value)
            try:
                return triton_fused.fused_quantize_triton(x, 4, **kw, pack=False)
            finally:
                for name, value in saved.items():
                    setattr(triton_fused, name, value)
        return run

    def torch_split():
        y = fused_ops.transform_reference(x, p1=kw["p1"], p2=kw["p2"]).contiguous()
        return split_quantize(y, m, k, d2, k, d2, 4, *gates, chunk)

    def imajor_split():
        y = imajor_kronecker(x, kw["p1"], kw["p2"])
        return split_quantize(y, m, k, d2, d2, m * d2, 4, *gates, chunk)

    out = [("production", production), ("torch + gate-quantize kernel", patched(MAX_TOKEN_KRON_TILE=0, MAX_CHUNK_KRON_D1=0)),
           (f"torch + split-quantize chunk={chunk}", torch_split), (f"i-major + split-quantize chunk={chunk}", imajor_split)]
    if triton_fused._kron_tile(kw["p1"].shape[0], d2) <= triton_fused.MAX_TOKEN_KRON_TILE:
        for precision in ("tf32x3", "bf16x3"):
            for warps in TOKEN_KERNEL_WARPS:
                out.append((f"token kernel {precision} w={warps}", patched(KRON_PRECISION=precision, TOKEN_KRON_WARPS=warps)))
    for ch in CHUNK_KERNEL_COLUMNS:
        for programs in (1, 2):
            out.append((f"chunk kernel ch={ch} programs/SM={programs}",
                        patched(MAX_TOKEN_KRON_TILE=0, KRON_CHUNK=ch, CHUNK_KRON_PROGRAMS=programs)))
    return out


# _chunk_kron_quantize_kernel's column chunk: on sm_90a with 8 warps, 64 (Dream-7B: 3 chunks of
# 148 padded to 192) takes 255 registers and 20 bytes of spills, 32 (5 chunks, 160) 241 and none
# (python -m stq_compiler.codegen.hopper_codegen)
CHUNK_KERNEL_COLUMNS = (32, 64) if not INTERPRET else (16,)


TOKEN_KERNEL_WARPS = (8,)  # 4 and 16 spill kilobytes and ran 2-3x slower (the results' first run)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="down-site.json")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--only", nargs="+", default=None, help="run the candidates whose name starts with one of these")
    args = ap.parse_args()
    device = "cpu" if INTERPRET else "cuda"
    if INTERPRET:
        cases, chunks = [(13, (6, 8)), (5, (20, 24))], [16]
    else:
        cases = [(m, kron) for m in args.tokens for kron in ((96, 128), (128, 148))]
        chunks = [1024, 2048, 4096]
    rows = []
    for m, kron in cases:
        x, kw = site_inputs(m, kron, device)
        cpu_kw = {n: t.cpu() for n, t in kw.items()}
        want = fused_ops.fused_quantize_reference(x.cpu(), 4, **cpu_kw, pack=False)
        seen = set()
        for chunk in chunks:
            for name, fn in candidates(x, kw, chunk):
                if name in seen or (args.only and not name.startswith(tuple(args.only))):
                    continue
                seen.add(name)
                try:
                    ok, numbers, us = check_and_time(fn, want, timed=not (INTERPRET or args.check_only))
                except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported
                    print(f"M={m} {kron} {name:40s} FAILED {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                    continue
                rows.append({"m": m, "kron": list(kron), "variant": name, "ok": ok, "us": us, **numbers})
                print(f"M={m} {str(kron):11s} {name:40s} {'ok ' if ok else 'BAD'} identical={numbers['codes_identical']:.6f}"
                      + (f" {us:8.1f} us" if us is not None else ""), flush=True)
        if not INTERPRET:
            Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    if not all(r["ok"] for r in rows):
        raise SystemExit("a candidate disagrees with the reference")


if __name__ == "__main__":
    main()
