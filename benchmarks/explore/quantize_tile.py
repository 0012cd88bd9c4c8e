"""Probe (GPU): the activation-side kernel's tokens per program and warps, at LLaDA-8B's q/k/v
(RMSNorm + 64x64 Kronecker + gate) and o (TAC + Kronecker + gate) sites, M = 1024, 4-bit codes one
a byte, against the unfused chain.

    python benchmarks/explore/quantize_tile.py --out $OUT/quantize-tile.json
"""
import argparse, json
from pathlib import Path

import torch
from triton.testing import do_bench

import stq_compiler.tac_ops  # noqa: F401
from stq_compiler.codegen import triton_fused

DEV = "cuda"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="quantize-tile.json")
    args = ap.parse_args()
    g = torch.Generator(device=DEV).manual_seed(0)
    m, k = 1024, 4096
    x = torch.randn(m, k, device=DEV, generator=g, dtype=torch.bfloat16)
    p1 = torch.linalg.qr(torch.randn(64, 64, device=DEV, generator=g))[0]
    p2 = torch.linalg.qr(torch.randn(64, 64, device=DEV, generator=g))[0]
    is_masked = torch.rand(m, device=DEV, generator=g) < 0.5
    gm = (torch.rand(k, device=DEV, generator=g) < 0.97).float()
    gu = (torch.rand(k, device=DEV, generator=g) < 0.97).float()
    tac_m = torch.eye(16, device=DEV).expand(k // 16, 16, 16).contiguous()
    tac_d = torch.zeros(k, device=DEV)
    sites = {
        "qkv": dict(rms_eps=1e-5, p1=p1, p2=p2, is_masked=is_masked, gate_masked=gm, gate_unmasked=gu, pack=False),
        "o": dict(tac_m=tac_m, tac_d=tac_d, p1=p1, p2=p2, is_masked=is_masked, gate_masked=gm, gate_unmasked=gu, pack=False),
        "gate-only": dict(is_masked=is_masked, gate_masked=gm, gate_unmasked=gu, pack=False),
    }
    tile, warps = triton_fused._quantize_tile, triton_fused._quantize_warps
    rows = []
    for budget in (4096, 8192, 16384, 32768):
        for w in (4, 8, 16):
            def my_tile(spec, mm, budget=budget):
                d1, d2, d1p, d2p, _ = tile(spec, mm)
                return d1, d2, d1p, d2p, max(1, min(budget // (d1p * d2p), 1 << (mm - 1).bit_length()))
            triton_fused._quantize_tile = my_tile
            triton_fused._quantize_warps = lambda e, w=w: w
            for name, kw in sites.items():
                try:
                    fn = lambda: triton_fused.fused_quantize_triton(x, 4, **kw)  # noqa: E731
                    fn()
                    us = do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
                except Exception as exc:  # noqa: BLE001
                    print("fail", budget, w, name, str(exc)[:150], flush=True)
                    continue
                rows.append({"site": name, "budget": budget, "warps": w, "us": us})
                print(f"{name:9s} budget={budget:6d} warps={w:2d} {us:8.1f} us", flush=True)
    triton_fused._quantize_tile, triton_fused._quantize_warps = tile, warps
    Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
