"""Calibration time and GPU memory at LLaDA-8B shapes (random weights), measured per block.

    python benchmarks/calibration.py --blocks 2 --samples 16 --seq-len 2048

Calibrates the first ``--blocks`` transformer blocks with ``method=starquant`` (SGAT, 15 epochs)
on ``--samples`` random-token sequences, measures each block's time and the peak GPU memory,
and extrapolates to all blocks and to the paper's 128 calibration sequences (block time scales
with the tokens it trains on). Results: ``benchmarks/results/calibration-<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from stq_compiler.calibration.calibrate import calibrate
from stq_compiler.models import build
from stq_compiler.models.llada import llada_8b_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--paper-samples", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")

    torch.backends.cuda.matmul.allow_tf32 = True  # SGAT trains in float32; TF32 products on the GPU
    config = llada_8b_config()
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = build(config).eval()
        torch.set_default_dtype(torch.float32)
    build_s = time.perf_counter() - start
    ids = torch.randint(0, config.mask_token_id, (args.samples, args.seq_len))
    torch.cuda.reset_peak_memory_stats()
    weights_gb = torch.cuda.memory_allocated() / 2**30
    start = time.perf_counter()
    recipe = calibrate(model, ids, "starquant", 4, 4, max_blocks=args.blocks, epochs=args.epochs, tac=False)
    total_s = time.perf_counter() - start
    timing = recipe.options["timing"]
    per_block = sum(timing["blocks_s"]) / len(timing["blocks_s"])
    n_blocks = config.n_layers
    scale = args.paper_samples / args.samples
    record = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "LLaDA-8B shapes, random bf16 weights",
        "samples": args.samples,
        "seq_len": args.seq_len,
        "epochs": args.epochs,
        "blocks_calibrated": args.blocks,
        "build_s": build_s,
        "calibrate_s": total_s,
        "timing": timing,
        "seconds_per_block": per_block,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
        "model_weights_gb": weights_gb,
        "extrapolated_all_blocks_s": timing["states_s"] + timing["capture_s"] + per_block * n_blocks,
        "extrapolated_all_blocks_paper_samples_s": (timing["states_s"] + per_block * n_blocks) * scale + timing["capture_s"],
    }
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    out = Path(args.out or Path(__file__).parent / "results" / f"calibration-{gpu}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
