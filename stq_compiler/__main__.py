"""The ``stq`` command (also ``python -m stq_compiler``).

``stq inspect [MODEL]``: capture MODEL's graph as ``torch.compile`` would (Dynamo, a recording
backend), run the starquant passes one by one and print what each did; optionally write, per
pass, the readable graph, its diff against the previous pass and graph exports (the files the
backend's ``debug_dir`` gets), the Triton kernel sources, and a per-site report.

MODEL is a built-in tiny random model (``tiny-llada``, the default; ``tiny-dream``, ``tiny-llama``,
``tiny-qwen2``), the bundled trained model (``stq-tiny-llada``), a checkpoint directory (``stq_compiler.models.load``), or ``module:function``
naming a function that takes no arguments and returns the model.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Optional

import torch

TINY_MODELS = {f"tiny-{arch}": arch for arch in ("llada", "dream", "llama", "qwen2")}


class ModelSpecError(ValueError):
    """A MODEL argument that names no model we can build."""


def resolve_model(spec: str, seed: int = 0) -> torch.nn.Module:
    """The model ``spec`` names, in eval mode (see the module docstring)."""
    from stq_compiler.models import CheckpointError, build_tiny, bundled_names, load

    if spec in TINY_MODELS:
        torch.manual_seed(seed)
        return build_tiny(TINY_MODELS[spec]).eval()
    if Path(spec).is_dir() or spec in bundled_names():
        try:
            return load(spec).eval()
        except CheckpointError as exc:
            raise ModelSpecError(f"model {spec!r}: {exc}") from exc
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        hint = ", ".join([*TINY_MODELS, *bundled_names()])
        raise ModelSpecError(
            f"model {spec!r} is not a built-in model ({hint}), an existing checkpoint directory, "
            "or module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"model {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ModelSpecError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelSpecError(f"model {spec!r}: {attr!r} is not callable")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ModelSpecError(f"model {spec!r}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _vocab_size(model: torch.nn.Module) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab:
        return vocab
    embedding = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if embedding is None:
        raise ModelSpecError("the model has no config.vocab_size and no nn.Embedding: cannot make input_ids for it")
    return embedding.num_embeddings


def example_input_ids(model: torch.nn.Module, batch: int, seq_len: int, mask_token_id: Optional[int], seed: int) -> torch.Tensor:
    """Random token ids; the second half of each sequence masked when a mask id is known."""
    ids = torch.randint(0, _vocab_size(model), (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    if mask_token_id is not None:
        ids[:, seq_len // 2 :] = mask_token_id
    return ids


def capture_graphs(model: torch.nn.Module, *args) -> list[tuple]:
    """Each graph Dynamo captures for ``model(*args)``, with its example inputs."""
    from stq_compiler.capture import keep_sources

    graphs = []

    def record(gm, example_inputs, **_):
        graphs.append((keep_sources(gm), list(example_inputs)))  # Dynamo drops grapharg on return
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=record)(*args)
    finally:
        torch._dynamo.reset()
    return graphs


def _options(args, model) -> dict:
    options = {"quantize_head": args.quantize_head, "quantize_embedding": args.quantize_embedding, "token_state": args.token_state, "inductor": False, "fuse": args.fuse}
    if args.recipe is not None:
        options["recipe"] = args.recipe
    mask = args.mask_token_id
    if mask is None and args.recipe is None:
        mask = getattr(getattr(model, "config", None), "mask_token_id", None)
    for name, value, default in (("w_bits", args.w_bits, 4), ("a_bits", args.a_bits, 4), ("mask_token_id", mask, None)):
        if value is not None or args.recipe is None:
            options[name] = value if value is not None else default
    return options


def inspect_command(args) -> int:
    from stq_compiler.inspect import ARTIFACTS, ArtifactWriter, format_sites, pass_row, print_table, site_report
    from stq_compiler.options import BackendOptions
    from stq_compiler.pipeline import run_passes

    model = resolve_model(args.model, args.seed)
    opts = BackendOptions.from_dict(_options(args, model))
    ids = example_input_ids(model, args.batch, args.seq_len, opts.mask_token_id, args.seed)
    start = time.perf_counter()
    graphs = capture_graphs(model, ids)
    print(f"{args.model}: input_ids {list(ids.shape)}, {len(graphs)} graph(s) captured in {time.perf_counter() - start:.2f} s; "
          f"W{opts.w_bits}A{opts.a_bits}, mask id {opts.mask_token_id}, "
          f"recipe {opts.recipe.method if opts.recipe is not None else 'none (rtn)'}")
    kinds = set(ARTIFACTS) if args.dump else {k for k in ARTIFACTS if getattr(args, k, False)}
    if kinds:
        kinds.add("table")
    out = Path(args.out)
    for i, (gm, inputs) in enumerate(graphs):
        writer = ArtifactWriter(out if kinds else None, kinds, index=i)
        result = run_passes(gm, inputs, opts, writer=writer)
        print()
        print_table([pass_row(r) for r in result.reports], title=f"graph {i}: {result.analysis.summary()}")
        if args.sites:
            print()
            print(format_sites(site_report(result, opts)), end="")
    if kinds:
        print(f"\nwrote {', '.join(sorted(kinds))} to {out}/graph_<n>*")
    if args.kernels:
        from stq_compiler.codegen import gluon_w4, triton_fused, triton_rtn

        kernel_dir = out / "kernels"
        written = 0
        # the round-to-nearest kernels at the top, the fused ones (fused_quantize, fused_linear, and
        # fused_linear's Gluon W4 kernel for Hopper) in fused/
        fused = {**triton_fused.kernel_sources(), **gluon_w4.kernel_sources()}
        for folder, sources in ((kernel_dir, triton_rtn.kernel_sources()), (kernel_dir / "fused", fused)):
            folder.mkdir(parents=True, exist_ok=True)
            for name, source in sources.items():
                (folder / f"{name}.py").write_text(source)
                written += 1
        print(f"wrote {written} kernel sources to {kernel_dir}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stq", description="stq_compiler tools")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "inspect",
        help="run the starquant passes on a model's captured graph and show what each did",
        description="Capture MODEL's graph as torch.compile would, run the starquant passes one by one and "
        "print what each did; optionally write each pass's graph, diff and exports, the kernel sources, a site report.",
    )
    p.add_argument("model", nargs="?", default="tiny-llada",
                   help=f"{', '.join(TINY_MODELS)} (default tiny-llada), stq-tiny-llada, a checkpoint directory, or module:function")
    p.add_argument("--recipe", help="a calibrated recipe (.stq); its bits and mask id apply")
    p.add_argument("--w-bits", type=int, choices=(4, 8, 16), help="weight bits (default 4; 16 = not quantized)")
    p.add_argument("--a-bits", type=int, choices=(4, 8, 16), help="activation bits (default 4)")
    p.add_argument("--mask-token-id", type=int, help="the [MASK] id (default: the model config's)")
    p.add_argument("--quantize-head", action="store_true", help="also quantize the LM head")
    p.add_argument("--quantize-embedding", action="store_true", help="also quantize the token embedding (int8 rows)")
    p.add_argument("--fuse", action="store_true", help="also run the fusion pass (fused quantizers and GEMMs, packed weights)")
    p.add_argument("--token-state", choices=("auto", "required", "off"), default="auto")
    p.add_argument("--seq-len", type=_positive, default=16, help="example sequence length (default 16)")
    p.add_argument("--batch", type=_positive, default=1, help="example batch size (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny model's weights and the example ids")
    p.add_argument("--out", default="stq_inspect", help="where files go (default ./stq_inspect)")
    p.add_argument("--graphs", action="store_true", help="write the readable graph after each pass")
    p.add_argument("--diffs", action="store_true", help="write each pass's unified diff against the previous graph")
    p.add_argument("--exports", action="store_true", help="write each graph as GraphML, node-link JSON (and DOT with pydot)")
    p.add_argument("--dump", action="store_true", help="all of the above: the files debug_dir gets")
    p.add_argument("--kernels", action="store_true", help="write the Triton kernel sources to OUT/kernels")
    p.add_argument("--sites", action="store_true", help="print a per-site report")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return inspect_command(args)
    except ModelSpecError as exc:
        print(f"stq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        # Refused options, recipes that do not fit, unreadable files: say what, not where.
        print(f"stq {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
