"""``make demo``: the bundled diffusion LLM at W4A4 with STaR-Quant, beside its float self.

Loads the bundled ``stq-tiny-llada`` (trained on the King James Bible and Wikipedia), applies the
STaR-Quant W4A4 recipe shipped beside it (or calibrates one with ``--calibrate``), compiles it with
``torch.compile(backend="starquant")``, generates from three prompts with the float and the W4A4
model side by side, and prints both models' masked-token perplexity on held-out text.

    python -m stq_compiler.demo [--calibrate] [--gen-length 48] [--steps 48] [--windows 32]
"""

from __future__ import annotations

import argparse
import textwrap
import time

import torch

from stq_compiler import Recipe, StarQuant, calibrate
from stq_compiler.evaluation import masked_token_perplexity, token_stream, windows
from stq_compiler.models import DEFAULT_MODEL, load, load_tokenizer
from stq_compiler.models.bundled import recipe_path
from stq_compiler.sampling import generate

PROMPTS = (
    "In the beginning God created",
    "And Jesus answered and said unto them,",
    "The city is the capital of the",
)


def _held_out_windows(tokenizer, count: int, length: int) -> dict[str, torch.Tensor] | None:
    """Held-out windows per corpus, or None when the corpus packages are not installed."""
    from stq_compiler.corpus import CorpusError, texts

    try:
        return {c: windows(token_stream(tokenizer, texts(c, "heldout")), length, count) for c in ("kjv", "wiki")}
    except CorpusError as e:
        print(f"(no perplexity: {e})")
        return None


def _recipe(model, tokenizer, args) -> Recipe:
    if not args.calibrate:
        path = recipe_path(args.model, "starquant-w4a4")
        print(f"recipe: {path.name} (shipped beside the model; --calibrate fits a new one)")
        return Recipe.load(path)
    from stq_compiler.corpus import texts

    ids = torch.cat([windows(token_stream(tokenizer, texts(c, "calibration")), 128, 32) for c in ("kjv", "wiki")])
    start = time.perf_counter()
    recipe = calibrate(model, ids, method="starquant", w_bits=4, a_bits=4)
    print(f"calibrated starquant W4A4 on {ids.shape[0]} × {ids.shape[1]} tokens in {time.perf_counter() - start:.0f} s")
    return recipe


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--calibrate", action="store_true", help="calibrate a recipe instead of loading the shipped one")
    parser.add_argument("--gen-length", type=int, default=48)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of 128 tokens per corpus for perplexity")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = load(args.model, dtype=torch.float32)  # float16 weights, float32 arithmetic on the CPU
    tokenizer = load_tokenizer(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    print(f"model: {args.model}, LLaDA architecture, {cfg.n_layers} layers, d_model {cfg.d_model}, {n_params / 1e6:.1f} M parameters")
    recipe = _recipe(model, tokenizer, args)
    backend = StarQuant(recipe=recipe)
    quantized = torch.compile(model, backend=backend, dynamic=False)

    sample = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length)
    print(f"\ngreedy sampling: gen_length {args.gen_length}, steps {args.steps}, block_length {args.block_length}\n")
    width = 58
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        start = time.perf_counter()
        texts_out = [tokenizer.decode(generate(m, ids, **sample)[0, ids.shape[1] :]) for m in (model, quantized)]
        print(f"prompt: {prompt!r}  ({time.perf_counter() - start:.0f} s, compile included)")
        left, right = (textwrap.wrap(t.replace("\n", " "), width) for t in texts_out)
        print(f"  {'float':<{width}}  | W4A4 STaR-Quant")
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            print(f"  {a:<{width}}  | {b}")
        print()

    held = _held_out_windows(tokenizer, args.windows, 128)
    if held:
        print(f"masked-token perplexity on held-out text ({args.windows} windows of 128 tokens per corpus, fixed masks)")
        print(f"  {'corpus':8} {'mask ratio':>10} {'float':>10} {'W4A4':>10}")
        for corpus, ids in held.items():
            for ratio in (0.25, 0.5):
                ppl = [masked_token_perplexity(m, ids, ratio, cfg.mask_token_id)["ppl"] for m in (model, quantized)]
                print(f"  {corpus:8} {ratio:>10} {ppl[0]:>10.2f} {ppl[1]:>10.2f}")
    result = backend.results[0]
    print(
        f"\nthe starquant backend compiled {len(backend.results)} graph(s) (one per input shape); the first has "
        f"{len(result.plan.transforms)} SGAT sites and {len(result.analysis.attention)} attention cores with TAC. "
        "`stq inspect` shows what each pass did."
    )


if __name__ == "__main__":
    main()
