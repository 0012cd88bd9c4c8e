"""Speed and memory of STaR-Quant models against float16 Inductor and W8A8 / FP8 peers (GPU).

    PYTHONPATH=. python benchmarks/speed.py                          # LLaDA-8B, 1x1024, default mode
    PYTHONPATH=. python benchmarks/speed.py --shapes 1x1024 4x1024 1x4096 --modes default reduce-overhead --resume
    PYTHONPATH=. python benchmarks/speed.py --models dream --e2e --resume
    python benchmarks/speed.py --tiny                                # tiny LLaDA and Dream on the CPU (CI)
    python benchmarks/speed.py --merge run1.json run2.json --out benchmarks/results/speed-nvidia-h200.json --note "..."
    PYTHONPATH=. python benchmarks/speed.py --set stq_compiler.codegen.triton_fused.TAC_WARPS=4  # A/B of a setting
                                                 # (--merge refuses its run unless --merge-overrides)

Each row is one way to run the model, measured per denoising step (one forward of ``input_ids``
[B, L], random ids with about half set to the mask token, at each ``--shapes`` BxL) and, with
``--e2e``, end to end (one ``stq_compiler.generate`` call: prompt 256, gen_length 256, steps 64,
block_length 32, batch 1):

* ``fp16-eager``: the float16 model itself (measured once, mode ``eager``);
* ``fp16-inductor``: ``torch.compile(model)``, the reference of every speedup (same model, batch,
  tokens and compile mode);
* ``w8a8-int_mm-peer``: W8A8 with dynamic per-token int8 activations as a user would build it:
  torchao's ``quantize_`` with its int8 dynamic-activation config when torchao imports, otherwise
  the same scheme by hand (per-channel symmetric int8 weights, per-token symmetric int8
  activations, ``torch._int_mm``, token × channel rescale); every nn.Linear of the transformer
  blocks, not the head or the embedding; then Inductor. ``peer_impl`` says which was used;
* ``fp8-scaled_mm-peer``: the same replacement with per-token e4m3 activations, per-channel e4m3
  weights and ``torch._scaled_mm`` (row-wise scales, float16 out where this torch allows it);
* ``starquant-w8a8``, ``starquant-w4a4``, ``starquant-w4a8``: the ``starquant`` backend with a
  STaR-Quant recipe (SGAT Kronecker transforms and state gates, TAC) and ``fuse`` (``--fuse
  on|off|both``; off rows end in ``-unfused``; W4A8 runs W4A4's kernels with 8-bit activation
  codes, ``tests/passes/test_fuse.py``); ``starquant-w4a4-qhead``: also ``quantize_head=True``;
  ``starquant-w4a4-qhead-qembed``: also ``quantize_embedding=True`` (int8 embedding rows). The
  embedding stays float16 in every other row.

Every compiled row runs under each ``--modes`` entry: ``default``, and ``reduce-overhead`` (CUDA
graphs). The starquant rows pass the mode to the backend, ``torch.compile(model,
backend=StarQuant(mode=..., **options))`` (the same backend as ``backend="starquant"`` with
``options={"mode": ...}``; it becomes Inductor's config patches, e.g. ``triton.cudagraphs=True``),
``"default"`` included: left out, the backend picks CUDA graphs for a model on a GPU. ``cudagraph_skips`` records whether Inductor declined CUDA graphs.
Compiles use ``dynamic=False``: each shape is its own compile (``compile_s``: the first call).

Timing: per call CUDA events (``time.perf_counter`` on the CPU), after the compile call and two
warm-up calls (three for the starquant rows: one more checks the logits once the float weights
are given back), as many calls as fit in about ``--seconds`` (5 to 50), median (``latency_ms``;
``latency_ms_p20``/``_p80`` beside it). A step row also records ``host_issue_ms``, the median
host time until the call returned (on a GPU, close to the latency: the step is host-bound), and
``gc_collections``, the garbage collector's runs per generation during the timed calls. Under
CUDA graphs each call starts a new step (``torch.compiler.cudagraph_mark_step_begin``).

Memory. The quantized rows are measured as the quantized model alone. The backend folds and
quantizes the weights at compile time into buffers of each graph module it compiles
(``passes/quantize_linears.py``, ``passes/fuse.py``); the float weights stay graph inputs that the
rewritten graph no longer reads, and the model keeps them until ``stq_compiler.release_float_weights``
gives them back. After the compile call this benchmark gives back the storage
(``untyped_storage().resize_(0)``) of the tensors that function would release
(``stq_compiler.release.releasable``), keeping them to refill for the next row; checks that the next call gives
the same logits without a recompile (``torch.compiler.set_stance("fail_on_recompile")`` while
timing, so a recompile can never read a released weight), and then measures. The peers replace the
block linears by modules with their own int8 / fp8 weights and give the float ones back the same
way before compiling. Released storages are refilled with random values of the same mean and
standard deviation before the next row (speed does not depend on the values).

* ``peak_gb``: ``torch.cuda.max_memory_allocated`` from a reset after the compile call (and after
  the release) to the end of the timed calls: weights, activations and CUDA-graph pools of the row
  at steady state. ``compile_peak_gb``: from a reset before the row's compile through its first
  call (for starquant this includes the float weights being folded). ``allocated_before_gb``: what
  was allocated when the row began (leaks from earlier rows would show here).
* ``weight_bytes``: the bytes of distinct storages the compiled model holds: the model's parameters
  and buffers (released ones are 0 bytes) and, for starquant rows, every buffer of the graph
  modules the backend compiled (packed codes, scales, weight sums, P1/P2, gates, TAC M/d).
  ``float_weights_released_bytes``: what was given back. If a starquant model fails without them
  (``note``), they are refilled and kept (``float_weights_kept_bytes``): ``peak_gb`` then includes
  them and ``peak_gb_minus_float_weights`` subtracts them.

Recipes: speed does not depend on the recipe's values, only on its shapes, so each recipe comes from
``stq_compiler.calibrate(method="starquant", epochs=--recipe-epochs (0), ...)`` on
``--recipe-samples`` (2) random sequences of ``--recipe-seq-len`` (64) tokens, no sampler
trajectories, TAC on ``--recipe-samples`` samples: P1/P2 are the random Hadamard start SGAT
trains from (0 epochs: not trained), the gates are placed by the observed state energies (d/32
private columns per state) and TAC is fitted, block by block, as in a real calibration (about a
minute at 8B). The ``-qhead`` row gets its own recipe, calibrated with ``quantize_head=True``.
Recipes are cached in ``--recipe-dir`` (default ``stq-speed-recipes`` in the temporary directory), named by model,
fingerprint, bits and settings; a second run reuses them.

The GEMM and fused-kernel micro-benchmark is ``benchmarks/fused_kernels.py``, not this file.

Results: ``benchmarks/results/speed-<gpu-name-slug>.json`` (or ``--out``), one record per row,
rewritten after every row, and a markdown table beside it (same stem, ``.md``). Time: on an H200,
LLaDA-8B builds in about 10 s, a recipe takes about a minute on a fresh machine and a compile about
a minute per row (estimates, not yet measured), so the default (LLaDA-8B, 1x1024, default mode,
every row) is about 9 minutes. ``--budget-min`` (8.5 by default on the GPU) starts no row that would
end after it, judged by the longest row so far; rows not run are listed as skipped, and the same
command with ``--resume`` (which keeps the records in ``--out`` and skips their rows) runs them. The
whole table is ``--shapes 1x1024 4x1024 1x4096 --modes default reduce-overhead --resume``, repeated
until nothing is skipped.
"""

from __future__ import annotations

import argparse
import ast
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from stq_compiler import StarQuant, calibrate, generate, release
from stq_compiler.models import build, build_dream, dream_7b_config, llada_8b_config, tiny_dream_config, tiny_llada_config
from stq_compiler.recipe import Recipe, RecipeError, fingerprint_from_model

RESULTS = Path(__file__).parent / "results"
MODELS = ("llada", "dream")
MODES = ("default", "reduce-overhead")
# row: (method, w_bits, a_bits), in the order rows run (the most telling first, when a budget stops a run)
ROWS = {
    "fp16-inductor": ("float16", 16, 16),
    "fp16-eager": ("float16", 16, 16),
    "starquant-w4a4": ("starquant", 4, 4),
    "w8a8-int_mm-peer": ("int8 dynamic activations, torch._int_mm", 8, 8),
    "starquant-w8a8": ("starquant", 8, 8),
    "starquant-w4a8": ("starquant", 4, 8),
    "fp8-scaled_mm-peer": ("fp8 e4m3 row-wise, torch._scaled_mm", 8, 8),
    "starquant-w4a4-qhead": ("starquant", 4, 4),
    "starquant-w4a4-qhead-qembed": ("starquant", 4, 4),
}
CUDA_ONLY = ("w8a8-int_mm-peer", "fp8-scaled_mm-peer")
BASELINE = "fp16-inductor"
RECIPE_FORMAT = 1  # bump when the way recipes are made here changes (cache file names carry it)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=None, help="default: llada (--tiny: llada dream)")
    p.add_argument("--shapes", nargs="+", default=None, help="BxL per step; default 1x1024 (--tiny: 1x64)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, help="default: all")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None, help="default: default (both: --modes default reduce-overhead)")
    p.add_argument("--fuse", choices=("on", "off", "both"), default="on", help="starquant rows with the fusion pass on, off or both")
    p.add_argument("--swiglu-epilogue", action="store_true",
                   help="starquant rows: the backend's swiglu_epilogue option (gate/up as one SwiGLU GEMM)")
    p.add_argument("--e2e", action="store_true", help="also time one generate() call per row (batch 1)")
    p.add_argument("--prompt-length", type=int, default=256)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.5, help="timed calls per row: about this long (5 to 50 calls)")
    p.add_argument("--recipe-dir", type=Path, default=Path(tempfile.gettempdir()) / "stq-speed-recipes")
    p.add_argument("--recipe-epochs", type=int, default=0)
    p.add_argument("--recipe-samples", type=int, default=2)
    p.add_argument("--recipe-seq-len", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--resume", action="store_true", help="keep the records in --out and skip their rows")
    p.add_argument("--budget-min", type=float, default=None,
                   help="start no row that would end after this many minutes, judged by the longest row so far "
                   "(default 8.5 on the GPU, none with --tiny; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="RUN_JSON",
                   help="measure nothing: merge these results files (runs of this script) into --out (see merge())")
    p.add_argument("--note", default="", help="with --merge: what the runs were for (kept in the file's runs list)")
    p.add_argument("--merge-overrides", action="store_true",
                   help="with --merge: also merge runs made with --set (their rows replace the rows of the same key)")
    p.add_argument("--tiny", action="store_true", help="tiny LLaDA and Dream, 1x64, float32 on the CPU: the script end to end (CI)")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE", dest="overrides",
                   help="a module constant for this run, e.g. stq_compiler.codegen.triton_fused.TAC_WARPS=4: two runs "
                   "in one lease, with and without, compare a kernel setting (leases differ by up to 0.6 ms); "
                   "recorded in every row's note (repeatable)")
    args = p.parse_args(argv)
    args.overrides = [_override(text, p) for text in args.overrides]
    args.cuda = args.device.startswith("cuda")
    if args.merge:
        if args.out is None:
            p.error("--merge needs --out (the results file to merge into)")
        return args
    if not args.tiny and not args.cuda:
        p.error("the 8B models need a CUDA GPU (--tiny runs on the CPU)")
    args.models = args.models or (list(MODELS) if args.tiny else ["llada"])
    args.shapes = [_shape(s, p) for s in (args.shapes or (["1x64"] if args.tiny else ["1x1024"]))]
    args.rows = args.rows or (
        ["fp16-eager", "fp16-inductor", *CUDA_ONLY, "starquant-w4a4", "starquant-w4a8", "starquant-w4a4-qhead-qembed"]
        if args.tiny and not args.cuda else list(ROWS)
    )
    args.modes = args.modes or ["default"]
    if args.tiny:
        args.prompt_length, args.gen_length, args.steps, args.block_length = (
            min(args.prompt_length, 16), min(args.gen_length, 16), min(args.steps, 4), min(args.block_length, 8))
        args.recipe_seq_len = min(args.recipe_seq_len, 32)
        args.seconds = min(args.seconds, 0.2)
    args.dtype = torch.float16 if args.cuda else torch.float32
    if args.budget_min is None and not args.tiny:
        args.budget_min = 8.5
    if args.out is None:
        args.out = RESULTS / f"speed-{_slug(_device_name(args))}{'-tiny' if args.tiny else ''}.json"
    return args


def _override(text: str, parser) -> tuple:
    """``--set MODULE.NAME=VALUE`` as (module, name, value, text): the module importable, the
    name one of its attributes, the value a Python literal of the attribute's type (None allowed
    either way)."""
    target, sep, literal = text.partition("=")
    module_name, _, name = target.strip().rpartition(".")
    if not sep or not module_name or not name:
        parser.error(f"--set {text!r}: expected MODULE.NAME=VALUE, e.g. stq_compiler.codegen.triton_fused.TAC_WARPS=4")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        parser.error(f"--set {text!r}: cannot import {module_name}: {exc}")
    if not hasattr(module, name):
        parser.error(f"--set {text!r}: {module_name} has no {name}")
    try:
        value = ast.literal_eval(literal.strip())
    except (ValueError, SyntaxError):
        parser.error(f"--set {text!r}: {literal.strip()!r} is not a Python literal (a number, True/False, None, 'text')")
    current = getattr(module, name)
    if current is not None and value is not None and type(value) is not type(current):
        parser.error(f"--set {text!r}: {module_name}.{name} is {type(current).__name__} ({current!r}), not {type(value).__name__}")
    return module, name, value, f"{module_name}.{name}={value!r}"


def _shape(text: str, parser) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        parser.error(f"shape {text!r} is not BxL, e.g. 1x1024")
    return int(match[1]), int(match[2])


def _device_name(args) -> str:
    return torch.cuda.get_device_name(torch.device(args.device)) if args.cuda else "cpu"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ----------------------------------------------------------------------------------------------
# Models and recipes


def build_model(name: str, args) -> nn.Module:
    """Random weights, built where they run, in the benchmark's dtype (building an 8B model on
    the CPU takes minutes, on the GPU seconds)."""
    if args.tiny:
        config = tiny_llada_config() if name == "llada" else tiny_dream_config()
    else:
        config = llada_8b_config() if name == "llada" else dream_7b_config()
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        torch.set_default_dtype(args.dtype)
        try:
            return (build(config) if name == "llada" else build_dream(config)).eval()
        finally:
            torch.set_default_dtype(torch.float32)


def starquant_recipe(model: nn.Module, name: str, w_bits: int, a_bits: int, quantize_head: bool, args) -> tuple[Recipe, dict]:
    """A STaR-Quant recipe for ``model`` (see the module docstring), from ``--recipe-dir`` when one
    made the same way is there. Returns the recipe and how it was obtained."""
    fingerprint = fingerprint_from_model(model)["sha256"][:12]
    settings = f"e{args.recipe_epochs}-n{args.recipe_samples}-l{args.recipe_seq_len}-s{args.seed}-v{RECIPE_FORMAT}"
    path = args.recipe_dir / f"{name}-{fingerprint}-w{w_bits}a{a_bits}{'-qhead' if quantize_head else ''}-{settings}.stq"
    how = {"recipe_file": path.name, "recipe": f"calibrate(method='starquant', epochs={args.recipe_epochs}) on "
           f"{args.recipe_samples} random sequences of {args.recipe_seq_len} tokens, TAC fitted"}
    if path.exists():
        try:
            recipe = Recipe.load(path)
            recipe.check_fits(model)
            return recipe, {**how, "recipe_cached": True}
        except RecipeError as exc:
            tqdm.write(f"recalibrating: cached recipe {path} unusable: {exc}")
    mask_id = model.config.mask_token_id
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, mask_id, (args.recipe_samples, args.recipe_seq_len), generator=gen)
    clock = time.perf_counter()
    recipe = calibrate(
        model, ids, "starquant", w_bits, a_bits, quantize_head=quantize_head, epochs=args.recipe_epochs,
        batch_size=args.recipe_samples, tac_samples=args.recipe_samples, trajectory_prompts=0,
        seed=args.seed, device=args.device, progress=False,
        sgat_select=False,  # every site keeps its gates: the kernels timed are the full method's
    )
    seconds = time.perf_counter() - clock
    recipe.save(path)
    return recipe, {**how, "recipe_cached": False, "recipe_calibration_s": round(seconds, 1)}


# ----------------------------------------------------------------------------------------------
# Releasing float weights a row does not need


class ReleasedWeights:
    """Float tensors whose storage was given back (``resize_(0)``: shape, strides, identity and
    device stay, so Dynamo's guards still hold) and what refilling them needs."""

    def __init__(self):
        self.held: list[tuple[torch.Tensor, int, float, float]] = []

    @torch.no_grad()
    def release(self, tensors) -> int:
        freed, seen = 0, set()
        for t in tensors:
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            std, mean = torch.std_mean(t.detach().float()) if t.numel() > 1 else (torch.zeros(()), t.detach().float().reshape(()))
            self.held.append((t, storage.nbytes(), float(mean), float(std)))
            freed += storage.nbytes()
            storage.resize_(0)
        return freed

    @torch.no_grad()
    def restore(self) -> None:
        for t, nbytes, mean, std in self.held:
            t.untyped_storage().resize_(nbytes)
            if std > 0:
                t.normal_(mean, std)
            else:
                t.fill_(mean)
        self.held = []


def _storages(t: torch.Tensor):
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):  # torchao's quantized weights
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _storages(getattr(t, name))
    else:
        yield t.untyped_storage()


def resident_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (released ones count 0)."""
    seen = {}
    for t in tensors:
        for storage in _storages(t):
            if storage.nbytes():
                seen[(str(storage.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------
# The W8A8 / FP8 peers


class Int8DynamicLinear(nn.Module):
    """torchao's int8 dynamic-activation int8-weight linear, written out: per-output-channel
    symmetric int8 weights, per-token symmetric int8 activations, ``torch._int_mm``, and the
    token × channel rescale."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
        self.register_buffer("weight_q", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        s = (x2.abs().amax(-1, keepdim=True).float() / 127).clamp(min=1e-8)
        xq = torch.round(x2.float() / s).clamp(-127, 127).to(torch.int8)
        y = (torch._int_mm(xq, self.weight_q.t()).float() * s * self.weight_scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1)


class Fp8RowwiseLinear(nn.Module):
    """e4m3 weights per output channel, e4m3 activations per token, ``torch._scaled_mm`` with
    row-wise scales (``scale_a`` [M, 1], ``scale_b`` [1, N], float32)."""

    out_dtype = torch.float16  # bfloat16 (then cast) where this torch's row-wise _scaled_mm wants it

    def __init__(self, linear: nn.Linear):
        super().__init__()
        fmax = torch.finfo(torch.float8_e4m3fn).max
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1) / fmax).clamp(min=1e-12)
        self.register_buffer("weight_fp8", (w / scale[:, None]).clamp(-fmax, fmax).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())
        self.bias = linear.bias

    def forward(self, x):
        fmax = torch.finfo(torch.float8_e4m3fn).max
        x2 = x.reshape(-1, x.shape[-1])
        s = (x2.abs().amax(-1, keepdim=True).float() / fmax).clamp(min=1e-12)
        x8 = (x2.float() / s).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=s, scale_b=self.weight_scale, out_dtype=self.out_dtype)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1)


def _fp8_out_dtype(device) -> tuple[torch.dtype, str]:
    """float16 out of a row-wise ``_scaled_mm`` where this torch allows it, else bfloat16."""
    a = torch.ones(32, 32, device=device).to(torch.float8_e4m3fn)
    sa, sb = torch.ones(32, 1, device=device), torch.ones(1, 32, device=device)
    try:
        torch._scaled_mm(a, a.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float16)
        return torch.float16, ""
    except RuntimeError as exc:
        return torch.bfloat16, f"row-wise _scaled_mm refuses float16 out here ({str(exc)[:80]}): bfloat16 out, cast to float16"


def _torchao_int8(linear: nn.Linear) -> nn.Module:
    """The linear quantized by torchao's int8 dynamic-activation int8-weight config (a copy: the
    float original stays, to be released and later swapped back)."""
    import torchao.quantization as tq

    config = tq.Int8DynamicActivationInt8WeightConfig() if hasattr(tq, "Int8DynamicActivationInt8WeightConfig") \
        else tq.int8_dynamic_activation_int8_weight()
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        copy.weight.copy_(linear.weight)
        if linear.bias is not None:
            copy.bias.copy_(linear.bias)
    holder = nn.Sequential(copy)
    tq.quantize_(holder, config)
    return holder[0]


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules of the transformer blocks (LLaDA ``.blocks.``, Dream ``.layers.``):
    not the LM head, not the embedding."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.search(r"\.(blocks|layers)\.\d+\.", n)]


def swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> list[tuple[nn.Module, str, nn.Linear]]:
    swapped = []
    for name, linear in block_linears(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, make(linear))
        swapped.append((parent, attr, linear))
    return swapped


def peer_factory(row: str, args) -> tuple[Callable[[nn.Linear], nn.Module], str, str]:
    """(linear -> quantized module, implementation name, note)."""
    if row == "w8a8-int_mm-peer":
        try:
            import torchao  # noqa: F401

            return _torchao_int8, f"torchao {torchao.__version__} quantize_(Int8DynamicActivationInt8Weight)", ""
        except ImportError:
            return Int8DynamicLinear, "by hand (torchao not importable): per-token int8 x, per-channel int8 W, torch._int_mm", ""
    out_dtype, note = _fp8_out_dtype(args.device)
    Fp8RowwiseLinear.out_dtype = out_dtype
    return Fp8RowwiseLinear, "by hand: per-token e4m3 x, per-channel e4m3 W, torch._scaled_mm row-wise", note


# ----------------------------------------------------------------------------------------------
# Timing


def _sync(args) -> None:
    if args.cuda:
        torch.cuda.synchronize(args.device)


def _logits(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def time_calls(fn: Callable[[], object], args, seconds: float, host: Optional[dict] = None) -> list[float]:
    """Milliseconds of each call of ``fn``: as many as fit in about ``seconds`` (5 to 50).
    ``host`` (if given) receives ``host_issue_ms``, the median host time until the call returned
    (on a GPU the work may still be running: a call is host-bound where this is close to its
    latency; on the CPU it is the latency), and ``gc_collections``, the garbage collector's runs
    of each generation during the timed calls."""
    _sync(args)
    clock = time.perf_counter()
    fn()
    _sync(args)
    estimate = time.perf_counter() - clock
    n = max(5, min(50, int(seconds / max(estimate, 1e-6))))
    times, issued = [], []
    collections = [g["collections"] for g in gc.get_stats()]
    for _ in range(n):
        if args.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            clock = time.perf_counter()
            start.record()
            fn()
            end.record()
            issued.append((time.perf_counter() - clock) * 1e3)
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            clock = time.perf_counter()
            fn()
            times.append((time.perf_counter() - clock) * 1e3)
            issued.append(times[-1])
    if host is not None:
        host["host_issue_ms"] = statistics.median(issued)
        host["gc_collections"] = [g["collections"] - c for g, c in zip(gc.get_stats(), collections)]
    return times


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class StepCaller:
    """Calls the model as the sampler does (``model(x)``), starting a new CUDA-graph step first
    under ``reduce-overhead``; has the model's ``config`` so ``generate`` can read it."""

    def __init__(self, fn, config, cudagraphs: bool):
        self.fn, self.config, self.cudagraphs = fn, config, cudagraphs

    def __call__(self, x):
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self.fn(x)


# ----------------------------------------------------------------------------------------------
# One row


@dataclass
class Unit:
    model: str
    row: str  # name in the table (starquant rows with fuse off end in -unfused)
    base: str  # key of ROWS
    mode: str  # eager, default, reduce-overhead
    batch: int
    tokens: int  # L per step; gen_length end to end
    kind: str  # step or e2e
    fuse: Optional[bool] = None
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.model, self.row, self.mode, self.batch, self.tokens, self.kind)


class Bench:
    """One model: its float16 weights, recipes and released storages, and the rows run on it."""

    def __init__(self, name: str, args):
        self.name, self.args = name, args
        clock = time.perf_counter()
        self.model = build_model(name, args)
        _sync(args)
        self.build_s = time.perf_counter() - clock
        self.float_bytes = resident_bytes([*self.model.parameters(), *self.model.buffers()])
        self.mask_id = self.model.config.mask_token_id
        self.released = ReleasedWeights()
        self.recipes: dict[tuple, tuple[Recipe, dict]] = {}

    def recipe(self, w_bits: int, a_bits: int, quantize_head: bool) -> tuple[Recipe, dict]:
        key = (w_bits, a_bits, quantize_head)
        if key not in self.recipes:
            self.released.restore()
            self.recipes[key] = starquant_recipe(self.model, self.name, w_bits, a_bits, quantize_head, self.args)
        return self.recipes[key]

    def inputs(self, batch: int, length: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.args.seed + batch * 100003 + length)
        ids = torch.randint(0, self.mask_id, (batch, length), generator=gen)
        ids[torch.rand(batch, length, generator=gen) < 0.5] = self.mask_id
        return ids.to(self.args.device)

    def prompt(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.args.seed + 7)
        return torch.randint(0, self.mask_id, (1, self.args.prompt_length), generator=gen).to(self.args.device)

    def run(self, unit: Unit) -> dict:
        args = self.args
        method, w_bits, a_bits = ROWS[unit.base]
        record = {
            "model": self.name, "row": unit.row, "method": method, "bits": f"W{w_bits}A{a_bits}", "w_bits": w_bits,
            "a_bits": a_bits, "mode": unit.mode, "kind": unit.kind, "batch": unit.batch, "tokens": unit.tokens,
            "dtype": str(args.dtype).removeprefix("torch."), "fuse": unit.fuse, "cudagraphs": unit.mode == "reduce-overhead",
            "compile_s": None, "note": "",
        }
        recipe = None
        if unit.base.startswith("starquant"):  # before the row's memory counters start
            recipe, how = self.recipe(w_bits, a_bits, "-qhead" in unit.base)
            record.update(how)
        self.released.restore()
        _reset_compiler()
        swapped: list = []
        try:
            return self._measure(unit, record, recipe, swapped)
        finally:
            for parent, attr, linear in swapped:
                setattr(parent, attr, linear)
            self.released.restore()
            _reset_compiler()

    def _measure(self, unit: Unit, record: dict, recipe: Optional[Recipe], swapped: list) -> dict:
        args, cuda = self.args, self.args.cuda
        notes = []
        if cuda:
            record["allocated_before_gb"] = torch.cuda.memory_allocated(args.device) / 2**30
            left = record["allocated_before_gb"] - self.float_bytes / 2**30
            if left > 0.5:  # peak_gb would count it
                notes.append(f"{left:.2f} GB beyond the model's weights allocated when the row began (left by earlier rows)")
            torch.cuda.reset_peak_memory_stats(args.device)
        compile_mode = None if unit.mode in ("eager", "default") else unit.mode
        cudagraphs = unit.mode == "reduce-overhead"
        backend, holders = None, [self.model]
        if unit.base in CUDA_ONLY:
            make, record["peer_impl"], note = peer_factory(unit.base, args)
            notes.append(note)
            try:
                swapped += swap_linears(self.model, make)
            except Exception as exc:  # noqa: BLE001 - torchao there but unusable: the peer by hand
                if make is not _torchao_int8:
                    raise
                notes.append(f"torchao failed ({type(exc).__name__}: {str(exc)[:100]}); the peer by hand")
                record["peer_impl"] = "by hand after torchao failed: per-token int8 x, per-channel int8 W, torch._int_mm"
                swapped += swap_linears(self.model, Int8DynamicLinear)
            record["float_weights_released_bytes"] = self.released.release([linear.weight for _, _, linear in swapped])
        if unit.base == "fp16-eager":
            fn = self.model
        elif recipe is not None:
            quantize_head, quantize_embedding = "-qhead" in unit.base, unit.base.endswith("-qembed")
            record["swiglu_epilogue"] = args.swiglu_epilogue
            backend = StarQuant(mode=unit.mode, recipe=recipe, fuse=unit.fuse, quantize_head=quantize_head,
                                quantize_embedding=quantize_embedding, swiglu_epilogue=args.swiglu_epilogue)
            fn = torch.compile(self.model, backend=backend, dynamic=False)
            notes.append("LM head and embedding quantized (int8 embedding rows)" if quantize_embedding
                         else "embedding not quantized" if quantize_head else "LM head and embedding not quantized")
        else:
            fn = torch.compile(self.model, mode=compile_mode, dynamic=False)
        caller = StepCaller(fn, self.model.config, cudagraphs)

        if unit.kind == "step":
            x = self.inputs(unit.batch, unit.tokens)
        else:
            x = torch.cat([self.prompt(), torch.full((1, args.gen_length), self.mask_id, device=args.device)], dim=1)
        skips = _cudagraph_skips()
        with torch.no_grad():
            _sync(args)
            clock = time.perf_counter()
            first = _logits(caller(x))[..., :64].float().clone()
            _sync(args)
            if unit.base != "fp16-eager":
                record["compile_s"] = time.perf_counter() - clock
            if cuda:
                record["compile_peak_gb"] = torch.cuda.max_memory_allocated(args.device) / 2**30
            # timed calls never recompile (and a recompile must never read a released weight)
            guard = unit.base != "fp16-eager"
            if backend is not None:
                holders += [r.gm for r in backend.results]
                # what stq_compiler.release_float_weights would give back (refilled after the row)
                released = self.released.release([t for _, t in release.releasable(self.model)])
                try:
                    with _no_recompile(True):
                        again = _logits(caller(x))[..., :64].float()
                    if not torch.allclose(first, again, rtol=1e-2, atol=1e-2):
                        raise RuntimeError(f"logits changed by {(first - again).abs().max():.3g}")
                    record["float_weights_released_bytes"] = released
                except Exception as exc:  # noqa: BLE001 - measured with the float weights kept instead
                    self.released.restore()
                    guard = False
                    record.update(float_weights_released_bytes=0, float_weights_kept_bytes=released)
                    notes.append(f"float weights kept: the model failed without them ({type(exc).__name__}: {str(exc)[:120]})")
            with _no_recompile(guard):
                if cuda:
                    torch.cuda.reset_peak_memory_stats(args.device)
                caller(x)  # warm-up (CUDA graphs record here)
                if unit.kind == "step":
                    times = time_calls(lambda: caller(x), args, args.seconds, host=record)
                    record["latency_ms"] = statistics.median(times)
                    record["tokens_per_s"] = unit.batch * unit.tokens / (record["latency_ms"] / 1e3)
                else:
                    times = self._generate_ms(caller, x[:, : args.prompt_length])
                    record["latency_ms"] = statistics.median(times)
                    record["e2e_s"] = record["latency_ms"] / 1e3
                    record["tokens_per_s"] = args.gen_length / record["e2e_s"]
                    record.update(prompt_length=args.prompt_length, gen_length=args.gen_length, steps=args.steps,
                                  block_length=args.block_length, step_ms=record["latency_ms"] / args.steps)
        record["latency_ms_p20"], record["latency_ms_p80"] = _quantile(times, 0.2), _quantile(times, 0.8)
        record["n_timed"] = len(times)
        record["peak_gb"] = torch.cuda.max_memory_allocated(args.device) / 2**30 if cuda else None
        if cuda and record.get("float_weights_kept_bytes"):
            record["peak_gb_minus_float_weights"] = record["peak_gb"] - record["float_weights_kept_bytes"] / 2**30
        record["weight_bytes"] = resident_bytes([t for h in holders for t in (*h.parameters(), *h.buffers())])
        record["weight_gb"] = record["weight_bytes"] / 2**30
        record["float_weight_gb"] = self.float_bytes / 2**30
        if cudagraphs:
            record["cudagraph_skips"] = _cudagraph_skips() - skips
            if record["cudagraph_skips"]:
                notes.append("Inductor skipped CUDA graphs for some graph (TORCH_LOGS=perf_hints says why)")
        record["note"] = "; ".join(n for n in notes if n)
        return record

    def _generate_ms(self, caller, prompt: torch.Tensor) -> list[float]:
        """Milliseconds of ``--e2e-repeats`` generate calls, after one more as warm-up."""
        args, times = self.args, []
        for _ in range(args.e2e_repeats + 1):
            _sync(args)
            clock = time.perf_counter()
            generate(caller, prompt, gen_length=args.gen_length, steps=args.steps, block_length=args.block_length)
            _sync(args)
            times.append((time.perf_counter() - clock) * 1e3)
        return times[1:]

    def close(self) -> None:
        """Give the model's memory back before the next model is built. Dropping it is not enough:
        something compiled kept its tensors alive past ``torch._dynamo.reset()`` (a LLaDA-8B's
        14.9 GB stayed allocated through the Dream rows of one run), so their storages are emptied."""
        self.released.restore()
        for t in (*self.model.parameters(), *self.model.buffers()):
            t.untyped_storage().resize_(0)
        del self.model
        self.recipes.clear()
        _reset_compiler()


def _no_recompile(on: bool):
    return torch.compiler.set_stance("fail_on_recompile") if on else nullcontext()


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def _reset_compiler() -> None:
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Plan, results


def plan(args) -> list[Unit]:
    """Per model, shape, mode: the rows in ROWS order (the baseline first); eager once per shape."""
    variants = []
    for row in sorted(set(args.rows), key=list(ROWS).index):
        if row.startswith("starquant"):
            for fuse in {"on": [True], "off": [False], "both": [True, False]}[args.fuse]:
                variants.append((row if fuse else row + "-unfused", row, fuse))
        else:
            variants.append((row, row, None))
    shapes = [("step", b, length) for b, length in args.shapes]
    if args.e2e:
        shapes.append(("e2e", 1, args.gen_length))
    units = []
    for model in args.models:
        for kind, batch, tokens in shapes:
            for i, mode in enumerate(args.modes):
                for name, base, fuse in variants:
                    if base == "fp16-eager":
                        if i == 0:
                            units.append(Unit(model, name, base, "eager", batch, tokens, kind, fuse))
                        continue
                    units.append(Unit(model, name, base, mode, batch, tokens, kind, fuse))
    return units


def why_not(unit: Unit, args) -> Optional[str]:
    if not args.cuda and unit.base in CUDA_ONLY:
        return "CUDA only (torch._int_mm / torch._scaled_mm on the GPU)"
    if not args.cuda and unit.mode == "reduce-overhead":
        return "CUDA graphs need a GPU"
    return None


def with_speedups(records: list[dict]) -> list[dict]:
    """Each record's speedup over float16 Inductor of the same model, batch, tokens, kind and
    compile mode (eager rows: against the default mode). A record marked ``stale`` (kept from an
    earlier run whose float16 row has since been re-measured) keeps the speedup against the
    float16 row of its own run."""
    base = {(r["model"], r["batch"], r["tokens"], r["kind"], r["mode"]): r["latency_ms"] for r in records
            if r["row"] == BASELINE and r.get("latency_ms")}
    for r in records:
        if r.get("stale"):
            continue
        ref = base.get((r["model"], r["batch"], r["tokens"], r["kind"], "default" if r["mode"] == "eager" else r["mode"]))
        r["speedup_vs_fp16_inductor"] = ref / r["latency_ms"] if ref and r.get("latency_ms") else None
    return records


def environment(args, argv) -> dict:
    import triton

    env = {
        "device": _device_name(args), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda if args.cuda else None, "python": platform.python_version(), "host": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        # paths of this machine (--out, --recipe-dir) as bare file names: the record travels
        "command": " ".join(["python benchmarks/speed.py",
                             *(Path(a).name if os.path.isabs(a) else a for a in (sys.argv[1:] if argv is None else argv))]),
    }
    try:
        import torchao

        env["torchao"] = torchao.__version__
    except ImportError:
        env["torchao"] = None
    return env


def write(args, env: dict, records: list[dict], skipped: list[dict], builds: dict) -> None:
    records = with_speedups(records)
    settings = {k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in vars(args).items() if k not in ("out", "recipe_dir")}
    result = {"environment": env, "settings": settings, "build_s": builds, "records": records, "skipped": skipped}
    if args.out.exists():  # a results file merged from several runs keeps their history (--merge)
        runs = json.loads(args.out.read_text()).get("runs")
        if runs:
            result["runs"] = runs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(env, records, skipped))


def _key(r: dict) -> tuple:
    return r["model"], r["row"], r["mode"], r["batch"], r["tokens"], r["kind"]


def run_overrides(run: dict) -> list[str]:
    """The ``--set`` overrides a run was made with (from its records, or for runs written before
    records named them, from its command)."""
    named = sorted({text for r in run["records"] for text in r.get("overrides", [])})
    command = run.get("environment", {}).get("command", "")
    return named or re.findall(r"--set[= ](\S+)", command)


def merge(into: Path, runs: list[Path], note: str, overrides: bool = False) -> dict:
    """Merge the records of the results files ``runs`` (each one run of this script, in order)
    into the results file ``into``: a record of a run replaces the one of the same model, row,
    mode, shape and kind. A run made with ``--set`` (a setting under trial) is refused unless
    ``overrides``: its rows would replace the production rows of their keys. Speedups are against
    the float16 Inductor row of the record's own run (``with_speedups`` on each run); a kept
    record whose float16 row a run re-measured is marked ``stale`` and keeps its speedup.
    ``into``'s ``runs`` list gains one entry (``note`` and the runs' commands); the markdown
    table beside it is rewritten."""
    base = json.loads(into.read_text()) if into.exists() else {"records": [], "skipped": [], "runs": []}
    loaded = [json.loads(Path(run).read_text()) for run in runs]
    for path, run in zip(runs, loaded):
        made_with = run_overrides(run)
        if made_with and not overrides:
            raise SystemExit(f"speed.py --merge: {path} was run with --set {' --set '.join(made_with)}; its rows would "
                             "replace the production rows of their keys. Merge it with --merge-overrides if that is meant.")
    # a run's speedups come from its own float16 rows only: a row whose run has none (an eager
    # row in a run without a default-mode float16 row) gets none, never one from another run
    new = [r for run in loaded for r in with_speedups(run["records"])]
    replaced = {_key(r) for r in new}
    remeasured = {(r["model"], r["batch"], r["tokens"], r["kind"], r["mode"]) for r in new if r["row"] == BASELINE}
    date = loaded[-1]["environment"]["date"]
    kept = []
    for r in base["records"]:
        if _key(r) in replaced:
            continue
        baseline = (r["model"], r["batch"], r["tokens"], r["kind"], "default" if r["mode"] == "eager" else r["mode"])
        if baseline in remeasured and r["row"] != BASELINE and not r.get("stale"):
            r["stale"] = f"kept from an earlier run; its float16 Inductor row was re-measured on {date}"
            r["note"] = "; ".join(filter(None, [r.get("note"), "earlier run: speedup against its own run's float16 row"]))
        kept.append(r)
    records = kept + new
    env = dict(loaded[-1]["environment"], command="merged from several runs: see 'runs'")
    result = {**base, "environment": env, "records": records,
              "runs": [*base.get("runs", []), {"date": date, "note": note,
                                               "commands": [run["environment"]["command"] for run in loaded]}]}
    into.write_text(json.dumps(result, indent=1, default=str) + "\n")
    into.with_suffix(".md").write_text(markdown(env, records, result.get("skipped", [])))
    return result


def _fmt(value, digits=2, spec="f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}{spec}}" if isinstance(value, float) else str(value)


def markdown(env: dict, records: list[dict], skipped: list[dict]) -> str:
    lines = [
        f"# Speed: {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, torchao {env['torchao']}; {env['date']}; "
        f"`{env['command']}`",
        "",
        "Per denoising step (one forward) unless the kind is e2e (one generate call). Speedup: over float16 Inductor, "
        "same model, batch, tokens and mode. Peak: max allocated at steady state (weights + activations); weights: "
        "bytes the compiled model holds. The embedding stays in the model's float dtype "
        f"({', '.join(sorted({r['dtype'] for r in records if r.get('dtype')}))}) except in the -qembed rows (int8 rows).",
        "",
        "| model | row | bits | mode | kind | B×L | latency ms | tokens/s | speedup | compile s | peak GB | weights GB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        shape = f"{r['batch']}×{r['tokens']}" if r["kind"] == "step" else f"1×{r.get('prompt_length', '')}+{r['tokens']}"
        note = r.get("error") and f"ERROR {r['error']}" or r.get("note", "")
        lines.append(
            f"| {r['model']} | {r['row']} | {r['bits']} | {r['mode']} | {r['kind']} | {shape} | {_fmt(r.get('latency_ms'))} | "
            f"{_fmt(r.get('tokens_per_s'), 0)} | {_fmt(r.get('speedup_vs_fp16_inductor'))} | {_fmt(r.get('compile_s'), 1)} | "
            f"{_fmt(r.get('peak_gb'))} | {_fmt(r.get('weight_gb'), 4, 'g')} | {note} |"
        )
    if skipped:
        lines += ["", "Not run: " + "; ".join(f"{s['model']} {s['row']} {s['mode']} {s['kind']} {s['batch']}×{s['tokens']} ({s['reason']})" for s in skipped)]
    return "\n".join(lines) + "\n"


def _line(r: dict) -> str:
    if r.get("error"):
        return f"{r['model']:5s} {r['row']:28s} {r['mode']:15s} {r['kind']:4s} {r['batch']}x{r['tokens']:<5d} ERROR {r['error']}"
    speedup = r.get("speedup_vs_fp16_inductor")
    return (f"{r['model']:5s} {r['row']:28s} {r['mode']:15s} {r['kind']:4s} {r['batch']}x{r['tokens']:<5d} "
            f"{r['latency_ms']:9.2f} ms {r['tokens_per_s']:10.0f} tok/s  x{speedup or float('nan'):5.2f}  "
            f"peak {_fmt(r.get('peak_gb'))} GB  weights {r['weight_gb']:.4g} GB")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args.out, args.merge, args.note, args.merge_overrides)
    env = environment(args, argv)
    saved = [(module, name, getattr(module, name)) for module, name, _, _ in args.overrides]
    for module, name, value, _ in args.overrides:
        setattr(module, name, value)
    try:
        return _measure(args, env)
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def _measure(args, env: dict) -> dict:
    """Every planned row not yet in ``--out`` (with ``--resume``), written after each."""
    set_note = "set " + ", ".join(text for *_, text in args.overrides) if args.overrides else ""
    records, skipped, builds = [], [], {}
    if args.resume and args.out.exists():
        records = [r for r in json.loads(args.out.read_text())["records"] if not r.get("error")]
    done = {(r["model"], r["row"], r["mode"], r["batch"], r["tokens"], r["kind"]) for r in records}
    units = plan(args)
    start, longest = time.perf_counter(), 0.0
    bench: Optional[Bench] = None
    progress = tqdm(units, desc="speed rows", unit="row")
    for unit in progress:
        if unit.key in done:
            continue
        reason = why_not(unit, args)
        if reason is None and args.budget_min and time.perf_counter() - start + longest > args.budget_min * 60:
            reason = f"--budget-min {args.budget_min}: would end after it (--resume runs it)"
        if reason is not None:
            skipped.append({**{k: getattr(unit, k) for k in ("model", "row", "mode", "kind", "batch", "tokens")}, "reason": reason})
            continue
        progress.set_postfix_str(f"{unit.model} {unit.row} {unit.mode} {unit.batch}x{unit.tokens}")
        if bench is None or bench.name != unit.model:
            if bench is not None:
                bench.close()
            bench = None
            _reset_compiler()
            bench = Bench(unit.model, args)
            builds[unit.model] = round(bench.build_s, 1)
        clock = time.perf_counter()
        try:
            record = bench.run(unit)
        except Exception as exc:  # noqa: BLE001 - a row that fails is reported and the others still run
            record = {"model": unit.model, "row": unit.row, "method": ROWS[unit.base][0], "bits": "W{}A{}".format(*ROWS[unit.base][1:]),
                      "mode": unit.mode, "kind": unit.kind, "batch": unit.batch, "tokens": unit.tokens, "fuse": unit.fuse,
                      "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        longest = max(longest, time.perf_counter() - clock)
        if set_note:
            record["note"] = "; ".join(filter(None, [record.get("note"), set_note]))
            record["overrides"] = [text for *_, text in args.overrides]
        records = [r for r in records if (r["model"], r["row"], r["mode"], r["batch"], r["tokens"], r["kind"]) != unit.key]
        records.append(record)
        write(args, env, records, skipped, builds)
        tqdm.write(_line(record), file=sys.stdout)
        sys.stdout.flush()
    progress.close()
    if bench is not None:
        bench.close()
    write(args, env, records, skipped, builds)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", flush=True)
    return {"records": records, "skipped": skipped}


if __name__ == "__main__":
    main()
