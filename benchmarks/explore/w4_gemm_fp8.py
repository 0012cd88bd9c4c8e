"""Probe (GPU): the transposed W4 GEMM on fp8 tensor cores instead of int8 ones.

Integers in [-8, 15] are exact in e4m3, so 4-bit codes can be multiplied on Hopper's fp8 tensor
cores (about 1.25x the int8 rate here: `results/fused-kernels-h200.json`). Hopper accumulates fp8
products with reduced precision (about 14 bits), but one wgmma step sums 32 products of at most
8 · 8 = 64 in magnitude (2048 < 2**14), and Triton promotes the accumulator to float32 after each
step by default (``max_num_imprecise_acc`` unset), where the whole sum (< 2**24) is exact: so the
result should be exact, which this probe checks against the integer reference.

The weight is unpacked as in ``triton_fused._w4_linear_kernel`` (four bytes a register) and
converted to e4m3 in registers (through float16); the activation codes are stored as e4m3 bytes
(here converted once up front; the activation kernel would write them so). Timed against the
int8 W4 kernel and ``torch._scaled_mm`` at LLaDA-8B's shapes.

    python benchmarks/explore/w4_gemm_fp8.py --out $OUT/w4-fp8.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from stq_compiler import fused_ops
from stq_compiler.codegen import triton_fused
from stq_compiler.codegen.triton_fused import _nibble_planes
from stq_compiler.codegen.triton_rtn import grouped_tile

DEV = "cuda"
SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)}
CONFIGS = [(256, 128, 128, 8, 3), (128, 128, 128, 4, 4), (128, 256, 128, 8, 3), (128, 128, 128, 4, 3)]


@triton.jit
def _w4_fp8_kernel(a_ptr, b_ptr, y_ptr, M, N, KB, stride_am, stride_bn, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
                   SWAR: tl.constexpr = True):
    """y[m, n] = Σ_k x[m, k] · w[n, k] in float32: x e4m3 codes [M, K], w packed 4-bit [N, K/2].
    Even K tiles only (a probe)."""
    pid_n, pid_m = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    HALF: tl.constexpr = BLOCK_K // 2
    w_ptrs = b_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_bn + tl.arange(0, HALF)[None, :]
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[None, :] * stride_am + tl.arange(0, BLOCK_K)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for _ in range(tl.cdiv(KB, HALF)):
        lo, hi = _nibble_planes(tl.load(w_ptrs), SWAR)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)).to(tl.float16).to(tl.float8e4nv)
        acc = tl.dot(w, tl.load(a_ptrs), acc, out_dtype=tl.float32)
        w_ptrs += HALF
        a_ptrs += BLOCK_K
    y = tl.trans(acc)
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], y, mask=ok)


def w4_fp8(x8, wp, cfg):
    m, n = x8.shape[0], wp.shape[0]
    bm, bn, bk, warps, stages = cfg
    y = torch.empty((m, n), dtype=torch.float32, device=x8.device)
    _w4_fp8_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
        x8, wp, y, m, n, wp.shape[1], x8.stride(0), wp.stride(0), y.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_N=8, num_warps=warps, num_stages=stages)
    return y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="w4-fp8.json")
    args = ap.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = []
    for m in (1024, 4096):
        for name, (k, n) in SHAPES.items():
            xq = torch.randint(-8, 8, (m, k), device=DEV, dtype=torch.int8, generator=gen)
            wq = torch.randint(-8, 8, (n, k), device=DEV, dtype=torch.int8, generator=gen)
            wp = fused_ops.pack_int4(wq.cpu()).to(DEV)
            x8 = xq.to(torch.float16).to(torch.float8_e4m3fn)
            exact = (xq.double() @ wq.double().t()).float()
            flops = 2.0 * m * n * k
            ones_m, ones_n = torch.ones(m, 1, device=DEV), torch.ones(n, device=DEV)
            zeros_m, w_sum = torch.zeros(m, 1, device=DEV, dtype=torch.int32), torch.zeros(n, device=DEV, dtype=torch.int32)

            def int8_kernel():
                return triton_fused.fused_linear_triton(xq, ones_m, zeros_m, wp, ones_n, w_sum, None, None, False, torch.float32)

            wf8 = wq.to(torch.float16).to(torch.float8_e4m3fn)
            one = torch.ones((), device=DEV)

            def scaled_mm():
                return torch._scaled_mm(x8, wf8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

            for kind, fn in [("w4-int8 (production)", int8_kernel), ("fp8 _scaled_mm (8-bit operands)", scaled_mm)] + [
                (f"w4-fp8 {cfg}", lambda cfg=cfg: w4_fp8(x8, wp, cfg)) for cfg in CONFIGS
            ]:
                try:
                    out = fn()
                    same = bool(torch.equal(out.float(), exact)) if kind != "fp8 _scaled_mm (8-bit operands)" else None
                    us = do_bench_cudagraph(fn, rep=50) * 1e3
                except Exception as exc:  # noqa: BLE001 - a configuration that fails is reported
                    print(f"M={m} {name:8s} {kind:36s} FAILED {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                    continue
                rows.append({"m": m, "linear": name, "kind": kind, "us": us, "tops": flops / us / 1e6, "exact": same})
                print(f"M={m} {name:8s} {kind:36s} {us:8.1f} us {flops / us / 1e6:7.1f} T/s exact={same}", flush=True)
            Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
