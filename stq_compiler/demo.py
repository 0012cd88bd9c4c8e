"""``make demo``: quantize a small LLaDA-architecture model with the starquant backend and compare.

Builds a small random-init LLaDA (the bundled trained model arrives later), compiles it with
``backend="starquant"`` at W8A8 and W4A4 round-to-nearest, and at W4A4 with QuaRot and
STaR-Quant recipes calibrated on random token sequences, runs the diffusion sampler with each,
and prints how closely each agrees with the float model.

    python -m stq_compiler.demo [--layers 4] [--d-model 256] [--gen-length 32] [--steps 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from stq_compiler.calibration.calibrate import calibrate
from stq_compiler.models import build_tiny
from stq_compiler.sampling import generate


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - test).pow(2).sum().clamp(min=1e-300)))


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = build_tiny(
        "llada",
        d_model=args.d_model,
        n_heads=args.d_model // 32,
        n_kv_heads=args.d_model // 32,
        n_layers=args.layers,
        mlp_hidden_size=args.d_model * 8 // 3 // 16 * 16,
        vocab_size=args.vocab,
        embedding_size=args.vocab,
        mask_token_id=args.vocab - 1,
    ).eval()
    mask_id = model.config.mask_token_id
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: LLaDA architecture, {args.layers} layers, d_model {args.d_model}, {n_params / 1e6:.1f} M parameters (random init)")

    prompts = torch.randint(0, args.vocab - 1, (args.prompts, args.prompt_length))
    sample = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length)
    probe = torch.cat([prompts, torch.full((args.prompts, args.gen_length), mask_id)], dim=1)
    with torch.no_grad():
        reference_logits = _logits(model(probe))
    reference = generate(model, prompts, **sample)

    calibration_ids = torch.randint(0, args.vocab - 1, (args.calibration_sequences, args.prompt_length + args.gen_length))
    runs = [
        ("float (starquant, quantization off)", {"w_bits": 16, "a_bits": 16, "mask_token_id": mask_id}),
        ("W8A8 RTN", {"w_bits": 8, "a_bits": 8, "mask_token_id": mask_id}),
        ("W4A4 RTN", {"w_bits": 4, "a_bits": 4, "mask_token_id": mask_id}),
    ]
    for method, label in (("quarot", "W4A4 QuaRot"), ("starquant", "W4A4 STaR-Quant (SGAT + TAC)")):
        start = time.perf_counter()
        recipe = calibrate(model, calibration_ids, method, 4, 4, seed=args.seed)
        print(f"calibrated {method} in {time.perf_counter() - start:.1f} s")
        runs.append((label, {"recipe": recipe}))

    rows = []
    for name, options in runs:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="starquant", options=options)
        start = time.perf_counter()
        with torch.no_grad():
            logits = _logits(compiled(probe))
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        out = generate(compiled, prompts, **sample)
        gen_s = time.perf_counter() - start
        generated = out[:, args.prompt_length :]
        agree = (generated == reference[:, args.prompt_length :]).float().mean().item()
        top1 = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
        rows.append((name, sqnr_db(reference_logits, logits), top1, agree, compile_s, gen_s))

    print(f"\nsampler: {args.prompts} prompts x {args.prompt_length} tokens, gen_length {args.gen_length}, steps {args.steps}, block_length {args.block_length}, greedy")
    header = f"{'backend=starquant':38} {'logits SQNR':>12} {'top-1 agree':>12} {'tokens agree':>13} {'compile s':>10} {'generate s':>11}"
    print(header)
    print("-" * len(header))
    for name, sqnr, top1, agree, compile_s, gen_s in rows:
        sqnr_text = "exact" if sqnr == float("inf") else f"{sqnr:.1f} dB"
        print(f"{name:38} {sqnr_text:>12} {top1:>12.1%} {agree:>13.1%} {compile_s:>10.1f} {gen_s:>11.1f}")
    print("\n'tokens agree': fraction of generated tokens identical to the float model's (eager) output.")


if __name__ == "__main__":
    main()
