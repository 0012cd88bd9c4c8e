"""Calibration time and GPU memory at LLaDA-8B shapes (random weights), measured per block.

    python benchmarks/calibration.py --blocks 2 --samples 128 --seq-len 2048
    python benchmarks/calibration.py --shapes small --blocks 4 --samples 16 --seq-len 128   # CPU profile

Calibrates the first ``--blocks`` transformer blocks with ``method=starquant`` (SGAT, 15 epochs)
on ``--samples`` random-token sequences (plus the sampler-trajectory states calibration adds),
streamed block by block: the model's weights stay on the CPU (``--weights cpu``) and each block's
move to the GPU while it is calibrated. Measures each block's time, split into its phases
(``graph_s``: graph copies and the block's piece; ``statistics_s``: the float forward with
observers; ``fit_s``: SGAT; ``quantized_forward_s``: the forward that hands the next block its
inputs), the peak GPU memory, and extrapolates to all blocks (block time does not depend on the
block) and to ``--paper-samples`` (block time scales with the tokens it trains on). ``--tac`` also
times TAC over all blocks. ``--shapes small`` (a 4-layer d=256 LLaDA) runs on the CPU when there is
no GPU: where a block's time goes, at small shapes. Results:
``benchmarks/results/calibration-<gpu or cpu-small>.json`` or ``--out``.
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
from stq_compiler.models.llada import llada_8b_config, tiny_llada_config

SMALL = {"d_model": 256, "n_heads": 4, "n_kv_heads": 4, "n_layers": 4, "mlp_hidden_size": 704, "vocab_size": 512,
         "embedding_size": 512, "max_sequence_length": 2048, "mask_token_id": 511}


def _model(config, weights: str, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights, built where they will be held."""
    torch.manual_seed(0)
    with torch.device("cuda" if weights == "gpu" else "cpu"):
        torch.set_default_dtype(dtype)
        try:
            return build(config).eval()
        finally:
            torch.set_default_dtype(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=("8b", "small"), default="8b")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--weights", choices=("cpu", "gpu"), default="cpu", help="where the model's weights are held")
    parser.add_argument("--tac", action="store_true", help="also fit TAC (all blocks; the extrapolation counts it once)")
    parser.add_argument("--paper-samples", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and args.shapes == "8b":
        raise SystemExit("this benchmark needs a CUDA GPU at 8B shapes (--shapes small runs on the CPU)")

    torch.backends.cuda.matmul.allow_tf32 = True  # SGAT trains in float32; TF32 products on the GPU
    config = llada_8b_config() if args.shapes == "8b" else tiny_llada_config(**SMALL)
    start = time.perf_counter()
    model = _model(config, args.weights if cuda else "cpu", torch.bfloat16 if args.shapes == "8b" else torch.float32)
    build_s = time.perf_counter() - start
    ids = torch.randint(0, config.mask_token_id, (args.samples, args.seq_len))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    weights_gb = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    start = time.perf_counter()
    recipe = calibrate(model, ids, "starquant", 4, 4, max_blocks=args.blocks, epochs=args.epochs, tac=args.tac,
                       device="cuda" if cuda else "cpu")
    total_s = time.perf_counter() - start
    timing = recipe.options["timing"]
    # the last calibrated block skips the quantized forward (no next block): count one anyway
    forward_s = [b["quantized_forward_s"] for b in timing["blocks"] if "quantized_forward_s" in b]
    missing_forward = sum(forward_s) / len(forward_s) if forward_s else 0.0
    per_block = (sum(timing["blocks_s"]) + missing_forward) / len(timing["blocks_s"])
    n_blocks = config.n_layers
    phases = ("graph_s", "statistics_s", "fit_s", "quantized_forward_s")
    share = {k: sum(b.get(k, 0.0) for b in timing["blocks"]) / sum(timing["blocks_s"]) for k in phases}
    scale = args.paper_samples / args.samples
    once = timing["states_s"] + timing["capture_s"] + timing.get("tac_s", 0.0)
    record = {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": f"LLaDA-8B shapes, random bf16 weights held on the {args.weights.upper()}" if args.shapes == "8b"
        else f"small LLaDA ({SMALL}), random float32 weights, CPU",
        "path": "streamed block by block",
        "samples": args.samples,
        "seq_len": args.seq_len,
        "epochs": args.epochs,
        "blocks_calibrated": args.blocks,
        "tac": args.tac,
        "build_s": build_s,
        "calibrate_s": total_s,
        "timing": timing,
        "seconds_per_block": per_block,
        "block_time_share": share,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "model_weights_on_gpu_gb": weights_gb,
        "extrapolated_all_blocks_s": once + per_block * n_blocks,
        "extrapolated_all_blocks_paper_samples_s": (timing["states_s"] + per_block * n_blocks + timing.get("tac_s", 0.0)) * scale + timing["capture_s"],
        "targets": {"all_blocks_s": 3600, "peak_gpu_gb": 24},
    }
    name = torch.cuda.get_device_name().split()[-1].lower() if cuda else "cpu"
    if args.shapes == "small":
        name += "-small"
    out = Path(args.out or Path(__file__).parent / "results" / f"calibration-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
