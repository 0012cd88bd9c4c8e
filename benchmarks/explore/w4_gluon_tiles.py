"""Probe (GPU): which tile the Gluon W4 GEMM (``codegen/gluon_w4.py``) should take at a given
number of tokens. At 512 tokens (every step of ``generate`` with a 256-token prompt and 256 new
tokens) the large 128 x 256 tile gives o_proj and down_proj 64 programs for the H200's 132
multiprocessors; the half-size tile gives 128. Times each configuration at LLaDA-8B's linears,
production epilogue (bf16 out; residual on o and down), under CUDA graphs.

    python benchmarks/explore/w4_gluon_tiles.py --out $OUT/w4-gluon-tiles.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from triton.testing import do_bench_cudagraph

from stq_compiler import fused_ops
from stq_compiler.codegen import gluon_w4

DEV = "cuda"
SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="w4-gluon-tiles.json")
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024])
    args = ap.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = []
    for m in args.tokens:
        for name, (k, n) in SHAPES.items():
            xq = torch.randint(-8, 8, (m, k), device=DEV, dtype=torch.int8, generator=gen)
            wq = fused_ops.pack_int4(torch.randint(-7, 8, (n, k), dtype=torch.int8))
            wq = wq.to(DEV)
            x_scale, x_zero = torch.rand(m, device=DEV) * 0.01, torch.randint(-8, 8, (m,), device=DEV, dtype=torch.int32)
            w_scale, w_sum = torch.rand(n, device=DEV) * 0.01, torch.randint(-100, 100, (n,), device=DEV, dtype=torch.int32)
            residual = torch.randn(m, n, device=DEV).bfloat16() if name in ("o", "down") else None
            y = torch.empty(m, n, device=DEV, dtype=torch.bfloat16)
            chosen = gluon_w4.config_for(m, n, torch.cuda.current_device())
            for config in gluon_w4.configs():
                def fn(config=config):
                    gluon_w4.w4_linear_gluon(xq, wq, x_scale, x_zero, w_scale, w_sum, None, residual, y, k, config)
                fn()
                us = do_bench_cudagraph(fn, rep=50) * 1e3
                tiles = triton.cdiv(m, config[1]) * triton.cdiv(n, config[0])
                rows.append({"m": m, "linear": name, "config": config, "tiles": tiles, "us": us,
                             "tops": 2.0 * m * n * k / us / 1e6, "chosen": config == chosen})
                print(f"M={m:5d} {name:8s} {'x'.join(map(str, config)):12s} tiles={tiles:4d} {us:8.1f} us "
                      f"{rows[-1]['tops']:7.1f} TOP/s{'  <- config_for' if config == chosen else ''}", flush=True)
    Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
