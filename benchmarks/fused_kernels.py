"""Speed of the fused kernels at LLaDA-8B shapes against torch's fp16, fp8 and int8 GEMMs (GPU).

    python benchmarks/fused_kernels.py --out "$OUT/fused-kernels.json"

GEMMs (TFLOP/s or TOP/s, 2·M·N·K over the median time of ``triton.testing.do_bench_cudagraph``:
device time, as the model runs them under CUDA graphs; plain ``do_bench`` also times each
launch's host work, which for the Gluon W4 kernel (TMA descriptors built in Python) exceeded a
1024-token o_proj's 30 µs of GPU time), for
M = 1024 and 4096 tokens and each linear of a LLaDA-8B block (q/k/v concatenated, o, gate/up
concatenated, down):

* ``fp16``: ``F.linear`` (cuBLAS); ``fp8``: ``torch._scaled_mm`` e4m3 with per-tensor scales;
  ``int8``: ``torch._int_mm``; ``rtn-w8a8``: ``triton_rtn.quantized_linear_triton`` (int8 codes);
* ``fused-w8a8`` / ``fused-w4a4`` / ``fused-w4a8``: ``stq::fused_linear`` (plain epilogue), and for
  gate/up ``+swiglu`` (output half as wide: the fp16 row then includes a separate SiLU·mul, and
  ``fused-w4a4+silu-mul`` is the plain W4A4 GEMM followed by Inductor's SiLU·mul kernel), for
  o/down ``+residual``. ``fused-w4a4`` holds the 4-bit activation codes one a byte and the weight
  in the blocked layout (``fused_ops.pack_int4_blocks``), as the fusion pass does (like
  ``fused-w4a8``); ``fused-w4a4-pairs`` the weight packed two neighbouring codes a byte
  (``pack_int4``); ``fused-w4a4-packed`` packs the activation codes two a byte as well (the kernel
  that unpacks both operands).

Activation side, per site: ``stq::fused_quantize`` (norm + Kronecker + gate + 4-bit pack; TAC +
Kronecker + gate) against the unfused chain it replaces (RMSNorm in torch, ``stq::kron_transform``,
``stq::quantize_per_token``), in microseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

from stq_compiler import fused_ops, ops
from stq_compiler.codegen import triton_fused, triton_rtn

DEV = "cuda"
HIDDEN, MLP = 4096, 12288
LINEARS = {  # name: (K, N)
    "qkv": (HIDDEN, 3 * HIDDEN),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (HIDDEN, 2 * MLP),
    "down": (MLP, HIDDEN),
}


def bench_ms(fn) -> float:
    fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))


def gemm_rows(m: int, name: str, k: int, n: int) -> list[dict]:
    gen = torch.Generator(device=DEV).manual_seed(m + k + n)
    x = torch.randn(m, k, device=DEV, generator=gen, dtype=torch.float16)
    w = torch.randn(n, k, device=DEV, generator=gen, dtype=torch.float16) * 0.02
    flops = 2.0 * m * n * k
    rows = []

    def add(kind, fn, note=""):
        try:
            ms = bench_ms(fn)
        except Exception as exc:  # noqa: BLE001 - a baseline this torch/GPU lacks is reported, not fatal
            rows.append({"m": m, "linear": name, "k": k, "n": n, "kind": kind, "error": f"{type(exc).__name__}: {exc}"[:200]})
            return
        rows.append({"m": m, "linear": name, "k": k, "n": n, "kind": kind, "ms": ms, "tflops": flops / ms / 1e9, "note": note})

    add("fp16", lambda: F.linear(x, w))
    if name == "gate_up":

        def fp16_swiglu():
            y = F.linear(x, w)
            return F.silu(y[:, : n // 2]) * y[:, n // 2:]

        add("fp16+swiglu", fp16_swiglu)
    x8 = x.to(torch.float8_e4m3fn)
    w8 = w.to(torch.float8_e4m3fn)
    one = torch.ones((), device=DEV)
    add("fp8", lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))

    xq8, xs8, xz8 = ops.quantize_per_token(x, 8)
    xq4p, xs4p, xz4p = fused_ops.fused_quantize(x, 4)
    xq4, xs4, xz4 = fused_ops.fused_quantize(x, 4, pack=False)
    xq8_store = xq8
    wq8 = ops.quantize_weight(w, 8)
    w4 = ops.quantize_weight(w, 4)
    wq4_pairs = fused_ops.pack_weight(w4)
    wq4 = dataclasses.replace(wq4_pairs, q=fused_ops.pack_int4_blocks(w4.q))  # what the fusion pass emits
    add("int8-_int_mm", lambda: torch._int_mm(xq8, wq8.q.t()))
    add("rtn-w8a8", lambda: triton_rtn.quantized_linear_triton(xq8, xs8, xz8, wq8.q, wq8.scale, wq8.w_sum, None, torch.bfloat16))

    def fused(xq, xs, xz, wp, residual=None, swiglu=False):
        return lambda: triton_fused.fused_linear_triton(xq, xs, xz, wp.q, wp.scale, wp.w_sum, None, residual, swiglu, torch.bfloat16)

    add("fused-w8a8", fused(xq8_store, xs8, xz8, wq8))
    add("fused-w4a4", fused(xq4, xs4, xz4, wq4))
    add("fused-w4a4-pairs", fused(xq4, xs4, xz4, wq4_pairs))
    add("fused-w4a4-packed", fused(xq4p, xs4p, xz4p, wq4_pairs))
    add("fused-w4a8", fused(xq8_store, xs8, xz8, wq4))
    if name == "gate_up":
        add("fused-w4a4+swiglu", fused(xq4, xs4, xz4, wq4, swiglu=True))
        # what the graph runs without the SwiGLU epilogue: the stacked GEMM, then Inductor's
        # SiLU·mul kernel
        silu_mul = torch.compile(lambda y: F.silu(y[:, : n // 2]) * y[:, n // 2:])
        stacked = fused(xq4, xs4, xz4, wq4)
        silu_mul(stacked())  # compiled outside the CUDA-graph capture
        add("fused-w4a4+silu-mul", lambda: silu_mul(stacked()))
    if name in ("o", "down"):
        res = torch.randn(m, n, device=DEV, generator=gen, dtype=torch.bfloat16)
        add("fused-w4a4+residual", fused(xq4, xs4, xz4, wq4, residual=res))
    return rows


def site_rows(m: int) -> list[dict]:
    from stq_compiler.calibration.transforms import kronecker_factors

    gen = torch.Generator(device=DEV).manual_seed(m)
    k = HIDDEN
    x = torch.randn(m, k, device=DEV, generator=gen, dtype=torch.bfloat16)
    d1, d2 = kronecker_factors(k)
    p1 = torch.linalg.qr(torch.randn(d1, d1, device=DEV, generator=gen))[0]
    p2 = torch.linalg.qr(torch.randn(d2, d2, device=DEV, generator=gen))[0]
    triton_fused.prepare_factor_splits(p1, p2)  # as the fusion pass does at compile time
    is_masked = torch.rand(m, device=DEV, generator=gen) < 0.5
    gm = (torch.rand(k, device=DEV, generator=gen) < 0.97).float()
    gu = (torch.rand(k, device=DEV, generator=gen) < 0.97).float()
    tac_m = torch.eye(16, device=DEV).expand(k // 16, 16, 16).contiguous()
    tac_d = torch.zeros(k, device=DEV)
    rows = []

    def unfused_qkv():
        n = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
        h = torch.ops.stq.kron_transform(n.float(), p1, p2)
        return torch.ops.stq.quantize_per_token(h, 4, is_masked, gm, gu)

    def unfused_o():
        z = torch.ops.stq.tac_block_affine(x, tac_m, tac_d)
        h = torch.ops.stq.kron_transform(z.float(), p1, p2)
        return torch.ops.stq.quantize_per_token(h, 4, is_masked, gm, gu)

    cases = {
        "qkv/gate_up site": (
            lambda: triton_fused.fused_quantize_triton(x, 4, rms_eps=1e-5, p1=p1, p2=p2, is_masked=is_masked, gate_masked=gm, gate_unmasked=gu,
                                                       pack=False),
            unfused_qkv,
        ),
        "o site": (
            lambda: triton_fused.fused_quantize_triton(x, 4, tac_m=tac_m, tac_d=tac_d, p1=p1, p2=p2, is_masked=is_masked, gate_masked=gm,
                                                       gate_unmasked=gu, pack=False),
            unfused_o,
        ),
    }
    for name, (fused, unfused) in cases.items():
        f_ms, u_ms = bench_ms(fused), bench_ms(unfused)
        rows.append({"m": m, "site": name, "k": k, "fused_us": f_ms * 1e3, "unfused_us": u_ms * 1e3,
                     "fused_gbps": (m * k * 2 + m * k) / f_ms / 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--linears", nargs="+", choices=list(LINEARS), default=list(LINEARS))
    parser.add_argument("--no-sites", action="store_true", help="GEMMs only, not the activation sites")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fused-kernels.json"))
    args = parser.parse_args()
    import stq_compiler.tac_ops  # noqa: F401  (registers stq::tac_block_affine)

    gemms, sites = [], []
    for m in args.tokens:
        for name in args.linears:
            k, n = LINEARS[name]
            for row in gemm_rows(m, name, k, n):
                gemms.append(row)
                if "error" in row:
                    print(f"M={m:5d} {name:8s} {row['kind']:22s} ERROR {row['error']}", flush=True)
                else:
                    print(f"M={m:5d} {name:8s} {row['kind']:22s} {row['ms'] * 1e3:9.1f} us {row['tflops']:7.1f} T/s", flush=True)
        for row in [] if args.no_sites else site_rows(m):
            sites.append(row)
            print(f"M={m:5d} {row['site']:18s} fused {row['fused_us']:8.1f} us  unfused {row['unfused_us']:8.1f} us", flush=True)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "host": platform.node(),
        "kron_precision": triton_fused.KRON_PRECISION,
        "gemm": gemms,
        "activation_sites": sites,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
