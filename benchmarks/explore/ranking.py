"""W4A4 logits SQNR of the methods and STaR-Quant's variants on tests/calibration/test_ranking.py's
outlier model, over model/calibration seeds (issue 3). One JSON line per (seed, variant) is
appended to ``--out``; finished pairs are skipped on a rerun, then the table is printed.

``--mask-outliers``: also scale a few channels of the mask token's embedding row 10-50x (other
channels than the norm outliers): outliers that depend on the token state, as the method presumes.

    PYTHONPATH=. .venv/bin/python benchmarks/explore/ranking.py --seeds 0 1 2 --calib-seeds 0 1 2 [--mask-outliers]

Each calibrate call takes ~6 s on two CPU cores; a table (9 variants x 9 seed pairs) ~10 min.
Torch's thread count changes the numbers by a few tenths of a dB (SGAT training is chaotic).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from stq_compiler.backend import StarQuant
from stq_compiler.calibration.calibrate import calibrate
from tests.calibration.test_ranking import outlier_model
from tests.conftest import logits_of, sqnr_db

# sgat_select is spelled out: the first five are the methods as they were before it existed.
VARIANTS = {
    "rtn": ("rtn", {}),
    "quarot": ("quarot", {}),
    "starquant": ("starquant", {"lr": 1e-2, "sgat_select": False}),
    "starquant-no-tac": ("starquant", {"lr": 1e-2, "sgat_select": False, "tac": False}),
    "starquant-no-sgat": ("starquant", {"lr": 1e-2, "sgat": False}),
    "starquant-tac-select": ("starquant", {"lr": 1e-2, "sgat_select": False, "tac_select": True}),
    "starquant-sgat-select": ("starquant", {"lr": 1e-2, "sgat_select": True}),
    "starquant-both-select": ("starquant", {"lr": 1e-2, "tac_select": True, "sgat_select": True}),
    "starquant-sgat-retrain": ("starquant", {"lr": 1e-2, "sgat_select": True, "sgat_retrain": True}),
    "starquant-sgat-select-no-tac": ("starquant", {"lr": 1e-2, "sgat_select": True, "tac": False}),
}



def _spread(values):
    """Sample standard deviation; 0 for a single run."""
    return statistics.stdev(values) if len(values) > 1 else 0.0

def run(seed, calib_seed, variant, mask_outliers):
    model = outlier_model(seed=seed, mask_outliers=mask_outliers)
    calib = torch.randint(0, 255, (64, 64))
    test = torch.randint(0, 255, (16, 64))
    test[torch.rand(16, 64) < 0.5] = model.config.mask_token_id
    with torch.no_grad():
        reference = logits_of(model(test))
    method, options = VARIANTS[variant]
    torch.manual_seed(calib_seed)
    clock = time.perf_counter()
    recipe = calibrate(model, calib, method, 4, 4, progress=False, seed=calib_seed, **options)
    seconds = time.perf_counter() - clock
    torch._dynamo.reset()
    with torch.no_grad():
        out = logits_of(torch.compile(model, backend=StarQuant(recipe=recipe, inductor=False))(test))
    torch._dynamo.reset()
    kept = {}  # what the selections kept: TAC blocks, sites with gates (kept / of)
    if "tac_kept" in recipe.options:
        blocks = [b for layer in recipe.options["tac_kept"].values() for b in layer]
        kept["tac_blocks_kept"] = f"{sum(blocks)}/{len(blocks)}"
    sites = [r for r in recipe.options.get("sgat_loss", {}).values() if "gates_kept" in r]
    if sites:
        kept["gated_sites_kept"] = f"{sum(r['gates_kept'] for r in sites)}/{len(sites)}"
        kept["retrained_sites"] = sum(bool(r.get("retrained")) for r in sites)
    return {"seed": seed, "calib_seed": calib_seed, "variant": variant, "mask_outliers": mask_outliers, "sqnr_db": sqnr_db(reference, out),
            "calibrate_s": round(seconds, 1), **kept}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model seeds (the test's is 0)")
    parser.add_argument("--calib-seeds", type=int, nargs="+", default=[0, 1, 2], help="calibrate(seed=...)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--mask-outliers", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/explore-ranking-w4a4-cpu.jsonl"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    key = lambda r: (r["seed"], r["calib_seed"], r["variant"], r["mask_outliers"])  # noqa: E731
    done = {key(r) for r in rows}
    pairs = [(s, c) for s in args.seeds for c in args.calib_seeds]
    for seed, calib_seed in pairs:
        for variant in args.variants:
            if (seed, calib_seed, variant, args.mask_outliers) in done:
                continue
            row = run(seed, calib_seed, variant, args.mask_outliers)
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    sqnr = {key(r): r["sqnr_db"] for r in rows}
    print(f"\nW4A4 logits SQNR (dB), mask_outliers={args.mask_outliers}, (model seed, calibration seed) in {pairs}")
    print("variant: mean ± sd over all runs | per model seed, mean over calibration seeds | vs starquant, paired: mean ± sd, wins")
    for variant in args.variants:
        vals = [sqnr.get((s, c, variant, args.mask_outliers)) for s, c in pairs]
        if None in vals:
            continue
        base = [sqnr.get((s, c, "starquant", args.mask_outliers)) for s, c in pairs]
        per_model = [statistics.mean(v for (s, _), v in zip(pairs, vals) if s == m) for m in args.seeds]
        line = f"{variant:24s} {statistics.mean(vals):6.2f} ± {_spread(vals):4.2f} | " + " ".join(f"{v:6.2f}" for v in per_model)
        if None not in base and variant != "starquant":
            diff = [v - b for v, b in zip(vals, base)]
            line += f" | {statistics.mean(diff):+5.2f} ± {_spread(diff):4.2f}, {sum(d > 0 for d in diff)}/{len(diff)}"
        print(line)


if __name__ == "__main__":
    main()
