"""Probe (GPU): run one activation site of LLaDA-8B / Dream-7B as production does (4-bit packed
codes), a warm-up call then one more, for Nsight Compute to read the second call's kernels.

    ncu --clock-control none -k regex:'kron|fused_quantize|tac' --launch-skip 1 --launch-count 1 \\
        --section WarpStateStats ... python benchmarks/explore/site_ncu.py --site "llada down"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_loop import site_inputs  # noqa: E402
from quantize_sites import SITES, patched  # noqa: E402

from stq_compiler.codegen import triton_fused  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--site", choices=list(SITES), required=True)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--precision", default=None, help="KRON_PRECISION to patch in")
    args = ap.parse_args()
    k, kron, stage = SITES[args.site]
    x, kw, tac_m, tac_d = site_inputs(args.tokens, k, kron, "cuda")
    if stage == "norm":
        kw["rms_eps"] = 1e-5
    if stage == "tac":
        kw.update(tac_m=tac_m, tac_d=tac_d)
    patch = {"KRON_PRECISION": args.precision} if args.precision else {}
    with patched(**patch):
        for _ in range(2):
            triton_fused.fused_quantize_triton(x, 4, **kw, pack=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
