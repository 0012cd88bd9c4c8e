"""Probe (GPU): the W4 GEMM on fp8 tensor cores, with the 4-bit weight turned into e4m3 bytes by
bit operations alone.

Why: the production W4 kernel (``triton_fused._w4_linear_kernel``) multiplies on int8 tensor
cores with an int32 accumulator. Triton's Hopper pipeliner keeps a wgmma "properly async" only
when its accumulator is float32 (``WGMMAPipeline.cpp``, rule 2.1), so the int8 kernel waits for
every wgmma before it unpacks the next weight tile: unpacking and MMA never overlap. On fp8 with
a float32 accumulator the register-operand dot is split in two and pipelined.

The conversion: e4m3 bytes 0x00..0x07 are the subnormals m · 2**-9, and 0x80 is the sign bit, so
a weight code w in [-7, 7] (the symmetric 4-bit weight grid) stored as a sign-magnitude nibble
``(w < 0) << 3 | |w|`` becomes the e4m3 byte ``(sign << 7) | |w|`` = w · 2**-9 exactly: two
operations for four low nibbles (shift, and-or), two for four high ones. (The earlier fp8 probe,
``w4_gemm_fp8.py``, converted through float16 and lost to the int8 kernel.) Activation codes in
[-8, 7] are exact e4m3 normals, written so by the activation kernel. The product sums are exact
float32 integers times 2**-9, rescaled by 512 in the epilogue, provided the tensor core's
reduced-precision fp8 accumulation (about 14 bits, DeepSeek-V3) does not round them: checked
here against the integer reference on random and on worst-case codes, with the accumulator
promoted to a float32 add every K step (``promote``) or not.

    python benchmarks/explore/w4_gemm_e4m3.py --out $OUT/w4-e4m3.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from stq_compiler import fused_ops
from stq_compiler.codegen import triton_fused
from stq_compiler.codegen.triton_rtn import grouped_tile

DEV = "cuda"
SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)}
CONFIGS = [(256, 128, 128, 8, 3), (128, 128, 128, 4, 4), (128, 128, 128, 8, 4), (128, 256, 128, 8, 3),
           (256, 128, 128, 8, 4), (128, 128, 256, 4, 3), (256, 128, 256, 8, 2), (64, 128, 128, 4, 5)]


@triton.jit
def _sign_magnitude_e4m3(wb):
    """Packed sign-magnitude nibbles (uint8) -> (low, high) e4m3 bytes, four bytes a register."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, u;
        shl.b32 t, $2, 4;
        and.b32 t, t, 0x80808080;
        and.b32 u, $2, 0x07070707;
        or.b32 $0, t, u;
        and.b32 t, $2, 0x80808080;
        shr.u32 u, $2, 4;
        and.b32 u, u, 0x07070707;
        or.b32 $1, t, u;
        }""",
        constraints="=r,=r,r", args=[wb], dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)


@triton.jit
def _w4_e4m3_kernel(a_ptr, b_ptr, y_ptr, M, N, KB, stride_am, stride_bn, stride_ym,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
                    PROMOTE: tl.constexpr):
    """y[m, n] = Σ_k x[m, k] · w[n, k] in float32; x e4m3 codes [M, K], w sign-magnitude nibbles
    [N, K/2]. Computed transposed (Yᵀ = W Xᵀ: the converted weight is the register operand).
    Even K tiles only (a probe)."""
    pid_n, pid_m = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    HALF: tl.constexpr = BLOCK_K // 2
    w_ptrs = b_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_bn + tl.arange(0, HALF)[None, :]
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[None, :] * stride_am + tl.arange(0, BLOCK_K)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for _ in range(tl.cdiv(KB, HALF)):
        lo, hi = _sign_magnitude_e4m3(tl.load(w_ptrs))
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)).to(tl.float8e4nv, bitcast=True)
        if PROMOTE:
            acc += tl.dot(w, tl.load(a_ptrs), out_dtype=tl.float32)
        else:
            acc = tl.dot(w, tl.load(a_ptrs), acc, out_dtype=tl.float32)
        w_ptrs += HALF
        a_ptrs += BLOCK_K
    y = tl.trans(acc) * 512.0
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], y, mask=ok)


def pack_sign_magnitude(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-7, 7] [N, K] (K even) -> uint8 [N, K/2], code 2j low nibble, 2j + 1 high."""
    nib = ((codes < 0).to(torch.int32) << 3) | codes.to(torch.int32).abs()
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)


def w4_e4m3(x8, wp, cfg, promote):
    m, n = x8.shape[0], wp.shape[0]
    bm, bn, bk, warps, stages = cfg
    y = torch.empty((m, n), dtype=torch.float32, device=x8.device)
    kernel = _w4_e4m3_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
        x8, wp, y, m, n, wp.shape[1], x8.stride(0), wp.stride(0), y.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_N=8, PROMOTE=promote, num_warps=warps, num_stages=stages)
    return y, kernel


def wgmma_waits(kernel) -> list[int]:
    """The pendings of every warp_group_dot_wait in the compiled kernel (0 inside the loop: the
    MMA is waited for before the next tile is prepared)."""
    return [int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", kernel.asm["ttgir"])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="w4-e4m3.json")
    args = ap.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    checks, rows = [], []
    # exactness: random codes, and the worst cases for a reduced-precision accumulator
    for (m, k, n) in [(1024, 4096, 4096), (1024, 12288, 4096), (256, 18944, 512)]:
        cases = {
            "random": (torch.randint(-8, 8, (m, k), device=DEV, generator=gen),
                       torch.randint(-7, 8, (n, k), device=DEV, generator=gen)),
            "all -8 x -7": (torch.full((m, k), -8, device=DEV), torch.full((n, k), -7, device=DEV)),
            "all 7 x 7, one -1": (torch.full((m, k), 7, device=DEV), torch.full((n, k), 7, device=DEV)),
        }
        cases["all 7 x 7, one -1"][1][:, -1] = -1
        for case, (xq, wq) in cases.items():
            xq, wq = xq.to(torch.int8), wq.to(torch.int8)
            exact = (xq.double() @ wq.double().t()).float()
            x8 = xq.to(torch.float16).to(torch.float8_e4m3fn)
            wp = pack_sign_magnitude(wq)
            for promote in (False, True):
                for cfg in CONFIGS[:2]:
                    y, kernel = w4_e4m3(x8, wp, cfg, promote)
                    err = (y.double() - exact.double()).abs().max().item()
                    checks.append({"m": m, "k": k, "n": n, "case": case, "promote": promote, "cfg": cfg,
                                   "exact": bool(torch.equal(y, exact)), "max_abs_err": err,
                                   "waits": wgmma_waits(kernel)})
                    print(checks[-1], flush=True)
    for m in (1024, 4096):
        for name, (k, n) in SHAPES.items():
            xq = torch.randint(-8, 8, (m, k), device=DEV, dtype=torch.int8, generator=gen)
            wq = torch.randint(-7, 8, (n, k), device=DEV, dtype=torch.int8, generator=gen)
            x8 = xq.to(torch.float16).to(torch.float8_e4m3fn)
            wp, wsm = fused_ops.pack_int4(wq.cpu()).to(DEV), pack_sign_magnitude(wq)
            flops = 2.0 * m * n * k
            ones_m, ones_n = torch.ones(m, 1, device=DEV), torch.ones(n, device=DEV)
            zeros_m, w_sum = torch.zeros(m, 1, device=DEV, dtype=torch.int32), torch.zeros(n, device=DEV, dtype=torch.int32)
            wf8 = wq.to(torch.float16).to(torch.float8_e4m3fn)
            one = torch.ones((), device=DEV)
            kinds = [
                ("w4-int8 (production)", lambda: triton_fused.fused_linear_triton(
                    xq, ones_m, zeros_m, wp, ones_n, w_sum, None, None, False, torch.float32)),
                ("fp8 _scaled_mm (8-bit operands)", lambda: torch._scaled_mm(
                    x8, wf8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)),
            ]
            for promote in (False, True):
                for cfg in CONFIGS if (m == 1024 and not promote) else CONFIGS[:4]:
                    kinds.append((f"w4-e4m3 promote={promote} {cfg}", lambda cfg=cfg, p=promote: w4_e4m3(x8, wsm, cfg, p)[0]))
            for kind, fn in kinds:
                try:
                    fn()
                    us = do_bench_cudagraph(fn, rep=50) * 1e3
                except Exception as exc:  # noqa: BLE001 - a configuration that fails is reported
                    print(f"M={m} {name:8s} {kind:44s} FAILED {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                    continue
                rows.append({"m": m, "linear": name, "kind": kind, "us": us, "tops": flops / us / 1e6})
                print(f"M={m} {name:8s} {kind:44s} {us:8.1f} us {flops / us / 1e6:7.1f} T/s", flush=True)
            Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                  "triton": triton.__version__, "checks": checks, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
