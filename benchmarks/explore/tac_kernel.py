"""Probe (GPU): the launch of ``_tac_affine_kernel`` (TAC before o_proj as its own kernel: one
[BLOCK_T, g] x [g, g] float32 dot a program per block of g channels and tile of tokens). In the
2-block profile it takes 19 µs a block at 1024 tokens of LLaDA-8B, where reading the float16
input and writing the float32 output (24 MB) would take about 6 at the H200's bandwidth.

Each (tokens a program, warps) is checked against a float64 reference of ``z M_bᵀ + d_b``
(relative error of the output, largest element) and timed with ``do_bench_cudagraph``, at LLaDA-8B's
width (4096) and Dream-7B's (3584), 1024 and 4096 tokens; production's launch is
``triton_fused.TAC_BLOCK_T`` and ``TAC_WARPS``.

    python benchmarks/explore/tac_kernel.py --out $OUT/tac-kernel.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

from stq_compiler.codegen import triton_fused

G = 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tac-kernel.json")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    args = ap.parse_args()
    production = (triton_fused.TAC_BLOCK_T, triton_fused.TAC_WARPS)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for m in args.tokens:
        for k in (4096, 3584):
            z = torch.randn(m, k, device="cuda", generator=gen).half()
            eye = torch.eye(G, device="cuda").expand(k // G, G, G)
            tac_m = 0.55 * eye + 0.45 * torch.randn(k // G, G, G, device="cuda", generator=gen) / 4
            tac_d = torch.randn(k, device="cuda", generator=gen) * 0.05
            want = (torch.einsum("tbi,boi->tbo", z.double().view(m, k // G, G), tac_m.double()).reshape(m, k)
                    + tac_d.double())
            for block_t in (32, 64, 128, 256):
                for warps in (1, 2, 4, 8):
                    triton_fused.TAC_BLOCK_T, triton_fused.TAC_WARPS = block_t, warps
                    try:
                        got = triton_fused.tac_affine_triton(z, tac_m, tac_d)
                        err = ((got.double() - want).abs().max() / want.abs().max()).item()
                        us = 1e3 * do_bench_cudagraph(lambda: triton_fused.tac_affine_triton(z, tac_m, tac_d))
                    except Exception as exc:  # noqa: BLE001 - a launch that does not compile is reported
                        print(f"M={m} K={k} block_t={block_t} warps={warps} FAILED {type(exc).__name__}: {str(exc)[:120]}")
                        continue
                    rows.append({"m": m, "k": k, "block_t": block_t, "warps": warps, "us": us, "max_rel_err": err,
                                 "production": (block_t, warps) == production})
                    print(f"M={m} K={k} block_t={block_t:3d} warps={warps} {us:7.1f} us err={err:.1e}"
                          f"{'  (production)' if (block_t, warps) == production else ''}", flush=True)
                    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    triton_fused.TAC_BLOCK_T, triton_fused.TAC_WARPS = production


if __name__ == "__main__":
    main()
