"""Probe (GPU): a W4 GEMM computed as Yᵀ = W Xᵀ, so the unpacked 4-bit weight is the wgmma A
operand straight from registers (no shared-memory round trip), activations as int8 codes; the
nibbles unpacked with shifts (``swar=False``) or four bytes a register (``swar=True``), over a
set of tile configurations, against the kernel it replaced, float16 cuBLAS and fp8 ``_scaled_mm``.

    python benchmarks/explore/w4_gemm_swapped.py --out $OUT/w4-swapped.json

``results/explore-w4-swapped-h200.json`` came from a standalone copy of the kernel, without
epilogue options, before it became ``triton_fused._w4_linear_kernel``; this script now launches
that production kernel (plain epilogue) with each configuration.
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from stq_compiler import fused_ops, ops
from stq_compiler.codegen import triton_fused

DEV = "cuda"
SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)}
CONFIGS = [(128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (64, 128, 128, 4, 4),
           (128, 128, 256, 8, 3), (64, 256, 128, 8, 3), (256, 256, 128, 8, 3), (128, 128, 128, 4, 4)]


def run(x, wp, xs, xz, ws, wsum, y, cfg, swar):
    m, k = x.shape
    n = wp.shape[0]
    bm, bn, bk, warps, stages = cfg
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    triton_fused._w4_linear_kernel_fixed[grid](
        x, wp, xs.reshape(-1), xz.reshape(-1), ws, wsum, ws, ws, y, m, n, k, k // 2,
        x.stride(0), wp.stride(0), 0, y.stride(0),
        HAS_BIAS=False, SWIGLU=False, HAS_RESIDUAL=False, BF16_BITS=False, SWAR=swar,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_N=8, num_warps=warps, num_stages=stages, enable_fp_fusion=False,
    )
    return y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="w4-swapped.json")
    args = ap.parse_args()
    rows, checks = [], []
    g = torch.Generator(device=DEV).manual_seed(0)
    # exactness of the integer part: unit scales, zero points 0, float32 out, against float64
    for (m, k, n) in [(1024, 4096, 4096), (4096, 12288, 4096), (7, 4096, 4096), (1024, 3584, 18944 * 2)]:
        x = torch.randint(-8, 8, (m, k), device=DEV, dtype=torch.int8, generator=g)
        w = torch.randint(-8, 8, (n, k), device=DEV, dtype=torch.int8, generator=g)
        wp = fused_ops.pack_int4(w.cpu()).to(DEV)
        one_m, one_n = torch.ones(m, device=DEV), torch.ones(n, device=DEV)
        zm, zn = torch.zeros(m, device=DEV, dtype=torch.int32), torch.zeros(n, device=DEV, dtype=torch.int32)
        ref = (x.double() @ w.double().T).float()
        for swar in (False, True):
            for cfg in CONFIGS[:3]:
                y = torch.empty(m, n, device=DEV)
                run(x, wp, one_m, zm, one_n, zn, y, cfg, swar)
                ok = bool(torch.equal(y, ref))
                checks.append({"m": m, "k": k, "n": n, "swar": swar, "cfg": cfg, "exact": ok})
                print("exact", m, k, n, swar, cfg, ok, flush=True)
    for m in (1024, 4096):
        for name, (k, n) in SHAPES.items():
            flops = 2.0 * m * n * k
            xh = torch.randn(m, k, device=DEV, dtype=torch.float16, generator=g)
            wh = torch.randn(n, k, device=DEV, dtype=torch.float16, generator=g) * 0.02
            base = {"fp16": lambda: F.linear(xh, wh)}
            x8, w8 = xh.to(torch.float8_e4m3fn), wh.to(torch.float8_e4m3fn)
            one = torch.ones((), device=DEV)
            base["fp8"] = lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            xq4, xs4, xz4 = ops.quantize_per_token(xh, 4)  # 4-bit codes held as int8
            wq = fused_ops.pack_weight(ops.quantize_weight(wh, 4))
            base["current-fused-w4a8store"] = lambda: triton_fused.fused_linear_triton(
                xq4, xs4, xz4, wq.q, wq.scale, wq.w_sum, None, None, False, torch.bfloat16)
            xq8, xs8, xz8 = ops.quantize_per_token(xh, 8)
            w8q = ops.quantize_weight(wh, 8)
            base["current-fused-w8a8"] = lambda: triton_fused.fused_linear_triton(
                xq8, xs8, xz8, w8q.q, w8q.scale, w8q.w_sum, None, None, False, torch.bfloat16)
            for kind, fn in base.items():
                fn(); ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                rows.append({"m": m, "linear": name, "kind": kind, "ms": ms, "tops": flops / ms / 1e9})
                print(f"M={m} {name:8s} {kind:26s} {ms*1e3:8.1f} us {flops/ms/1e9:7.1f}", flush=True)
            y = torch.empty(m, n, device=DEV, dtype=torch.bfloat16)
            ref = triton_fused.fused_linear_triton(xq4, xs4, xz4, wq.q, wq.scale, wq.w_sum, None, None, False, torch.bfloat16)
            for swar in (False, True):
                for cfg in CONFIGS:
                    try:
                        fn = lambda: run(xq4, wq.q, xs4, xz4, wq.scale, wq.w_sum, y, cfg, swar)  # noqa: E731
                        fn()
                        same = bool(torch.equal(y, ref))
                        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                    except Exception as exc:  # noqa: BLE001
                        print("fail", cfg, swar, str(exc)[:200], flush=True)
                        continue
                    rows.append({"m": m, "linear": name, "kind": f"swapped swar={swar}", "cfg": cfg, "ms": ms,
                                 "tops": flops / ms / 1e9, "equal_to_current": same})
                    print(f"M={m} {name:8s} swapped swar={int(swar)} {cfg} {ms*1e3:8.1f} us {flops/ms/1e9:7.1f} same={same}", flush=True)
            Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "checks": checks, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
