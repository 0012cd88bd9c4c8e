"""Where a denoising step's GPU time goes, kernel by kernel: float16 Inductor against STaR-Quant.

    python benchmarks/profile_step.py --layers 2 --out $OUT/profile-step.json

LLaDA-8B's exact layer shapes (random weights) with ``--layers`` blocks instead of 32: every
block runs the same kernels, so the per-block breakdown holds for the full model, and the model
builds, calibrates and compiles in seconds. The STaR-Quant recipe comes from a 0-epoch
calibration on two random sequences, as in ``benchmarks/speed.py`` (speed does not depend on
the values). Each variant is compiled in the default mode (no CUDA graphs, so every kernel shows
in the trace), warmed up, then ``--steps`` forwards of 1 × ``--tokens`` run under
``torch.profiler``; the table lists, per kernel name, calls and device time per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from stq_compiler import calibrate
from stq_compiler.backend import StarQuant
from stq_compiler.models import build
from stq_compiler.models.llada import llada_8b_config


def kernel_table(fn, steps: int) -> tuple[list[dict], float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = e.cuda_time_total
        if us <= 0:
            continue
        rows.append({"kernel": e.key[:160], "calls_per_step": e.count / steps, "us_per_step": us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    return rows, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/profile-step.json"))
    args = ap.parse_args()
    config = dataclasses.replace(llada_8b_config(), n_layers=args.layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.float16)
        model = build(config).eval()
        torch.set_default_dtype(torch.float32)
    mask = config.mask_token_id
    ids = torch.randint(0, mask, (1, args.tokens), device="cuda")
    ids[torch.rand(ids.shape, device="cuda") < 0.5] = mask
    calib = torch.randint(0, mask, (2, 64))
    recipe = calibrate(model, calib, "starquant", args.bits, args.bits, epochs=0, batch_size=2, tac_samples=2,
                       trajectory_prompts=0, device="cuda", progress=False, sgat_select=False)  # gates on every site
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
              "tokens": args.tokens, "bits": args.bits, "variants": {}}
    variants = {
        "fp16-inductor": lambda: torch.compile(model),
        f"starquant-w{args.bits}a{args.bits}-fused": lambda: torch.compile(model, backend=StarQuant(mode="default", recipe=recipe, fuse=True)),
        f"starquant-w{args.bits}a{args.bits}-unfused": lambda: torch.compile(model, backend=StarQuant(mode="default", recipe=recipe, fuse=False)),
    }
    with torch.no_grad():
        for name, make in variants.items():
            torch._dynamo.reset()
            compiled = make()
            rows, total = kernel_table(lambda: compiled(ids), args.steps)
            result["variants"][name] = {"device_us_per_step": total, "us_per_block": total / args.layers, "kernels": rows[:40]}
            print(f"\n== {name}: {total:.0f} us of device time per step ({total / args.layers:.0f} per block)", flush=True)
            for r in rows[:25]:
                print(f"{r['us_per_step']:9.1f} us {r['calls_per_step']:5.1f}x  {r['kernel'][:110]}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
