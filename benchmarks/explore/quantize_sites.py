"""Probe (GPU): the activation kernel at LLaDA-8B's and Dream-7B's sites, as production runs it and
with a variant that could replace it.

* ``production``: ``triton_fused.fused_quantize_triton`` as is (TAC as its own kernel first;
  LLaDA-8B's down site one token a program, Dream-7B's too in ``_token_kron_split_kernel``, its
  148 columns as 128 + 64: since 2026-11-29, session 11);
* ``tf32``: the Kronecker dots in one TF32 pass: how many codes move;
* ``maxnreg=N`` (``--registers``): registers capped at N a thread (ptxas), so that more programs fit a
  multiprocessor;
* ``factors split in the kernel``: without the bfloat16 splits of the Kronecker factors made once
  on the host (``FUSED_KRON_PRESPLIT``, ``TOKEN_KRON_PRESPLIT``, ``CHUNK_KRON_PRESPLIT``): what
  production ran before 2026-11-29 (session 10);
* LLaDA-8B's down site: ``uncapped``, without the register cap (the split factors' shared memory
  leaves one program a multiprocessor either way);
* Dream-7B's down site: ``chunk kernel``, ``_chunk_kron_quantize_kernel`` (the second factor 64
  columns at a time), which ran it until session 11 (in that session's run, production was still
  the chunk kernel and the split kernel's row was called ``column blocks 128 + 64``: 150 against
  216 µs). ``_token_kron_split_kernel`` with 64 + 32 or 128 + 32 blocks is not probed: on the H200
  it computed wrong codes or faulted, which ends the process (``triton_fused.MIN_SPLIT_BLOCK``);
* ``tf32x3``: the Kronecker dots as three TF32 products, production's precision until
  2026-11-29 (production's is now bf16x3, three bfloat16 products of hi + lo splits,
  ``triton_fused._dot_f32``: half the tensor-core work).

``benchmarks/results/explore-quantize-sites-h200.json`` also holds the variants of commit 719340c:
``two-pass`` (X P2 as a tiled GEMM writing float32, then one program a token for P1ᵀ and the
quantizer) at the down sites with their launch configurations, and at the 64 x 64 sites; slower
than what production runs everywhere, so that path was removed. The one-program path with the
down site's whole padded token (128 x 128) ran out of shared memory (262144 bytes asked).

Each is checked against ``fused_ops.fused_quantize_reference`` (the criterion of the CUDA tests) and
timed with ``do_bench_cudagraph``.

    python benchmarks/explore/quantize_sites.py --out $OUT/quantize-sites.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_loop import check_and_time, site_inputs  # noqa: E402

from stq_compiler import fused_ops  # noqa: E402
from stq_compiler.codegen import triton_fused  # noqa: E402

SITES = {  # name: (K, Kronecker factors, stages)
    "llada qkv": (4096, (64, 64), "norm"),
    "llada o": (4096, (64, 64), "tac"),
    "llada down": (12288, (96, 128), ""),
    "dream qkv": (3584, (56, 64), "norm"),
    "dream down": (18944, (128, 148), ""),
}


class patched:
    def __init__(self, **values):
        self.values, self.saved = values, {}

    def __enter__(self):
        for name, value in self.values.items():
            self.saved[name] = getattr(triton_fused, name)
            setattr(triton_fused, name, value)

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(triton_fused, name, value)


def variants(site, extra=False):
    out = [("production", {})]
    if not extra:
        out += [("tf32x3", {"KRON_PRECISION": "tf32x3"}), ("bf16", {"KRON_PRECISION": "bf16"})]
        if SITES[site][0] <= 4096:
            out.append(("tf32", {"KRON_PRECISION": "tf32"}))
    elif SITES[site][0] <= 4096:  # registers capped for more programs a multiprocessor
        out += [(f"maxnreg={n}", {"QUANTIZE_MAXNREG": n}) for n in (128, 80, 64)]
    elif "llada" in site:
        out += [(f"maxnreg={n}", {"TOKEN_KRON_MAXNREG": n}) for n in (128, 112)]
    if not extra:
        key = "TOKEN_KRON_PRESPLIT" if site.endswith("down") else "FUSED_KRON_PRESPLIT"  # both down sites: one token a program
        out.append(("factors split in the kernel", {key: False}))
    if site == "llada down":
        out.append(("uncapped", {"TOKEN_KRON_MAXNREG": None}))
    if site == "dream down" and not extra:
        out.append(("chunk kernel", {"SPLIT_TOKEN_ROWS": False}))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="quantize-sites.json")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--registers", action="store_true", help="production beside register caps, not precisions")
    args = ap.parse_args()
    rows = []
    for m in args.tokens:
        for site, (k, kron, stage) in SITES.items():
            x, common, tac_m, tac_d = site_inputs(m, k, kron, "cuda")
            kw = dict(common)
            if stage == "norm":
                kw["rms_eps"] = 1e-5
            if stage == "tac":
                kw.update(tac_m=tac_m, tac_d=tac_d)
            triton_fused.prepare_factor_splits(kw["p1"], kw["p2"])  # as the fusion pass does
            cpu_kw = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
            want = fused_ops.fused_quantize_reference(x.cpu(), 4, **cpu_kw, pack=False)
            for name, patch in variants(site, args.registers):
                def fn():
                    with patched(**patch):
                        return triton_fused.fused_quantize_triton(x, 4, **kw, pack=False)
                try:
                    ok, numbers, us = check_and_time(fn, want, timed=True)
                except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported
                    print(f"M={m} {site:11s} {name:22s} FAILED {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                    continue
                rows.append({"m": m, "k": k, "site": site, "variant": name, "ok": ok, "us": us, **numbers,
                             "launches": dict(triton_fused.PRESPLIT_LAUNCHES)})
                triton_fused.PRESPLIT_LAUNCHES.clear()
                print(f"M={m} {site:11s} {name:22s} {'ok ' if ok else 'BAD'} identical={numbers['codes_identical']:.6f} "
                      f"maxdiff={numbers['max_code_diff']} {us:8.1f} us", flush=True)
                Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
