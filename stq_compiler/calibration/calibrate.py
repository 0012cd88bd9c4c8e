"""``calibrate(model, data, method=...) -> Recipe``: fit a method's per-site transforms (and TAC).

The model is captured once the way the backend sees it (Dynamo, one graph), analysed for its
sites, attention cores and token-state source, and then calibrated block by block: for block b
the graph is rewritten with every earlier block quantized with what was fitted for it, observers
are inserted at block b's site inputs, the calibration inputs are run, and block b's sites are
fitted from what the observers saw. TAC (STaR-Quant) is fitted last, from the graph with every
transform on, quantizers off ("reference") and on ("quantized").

Calibration inputs follow how a diffusion LLM is used: masked-diffusion corruptions of the
calibration sequences at mask ratios spread over (0, 1), and the states along real sampler
trajectories (``stq_compiler.generate``) started from the sequences' first halves.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from stq_compiler.analysis import GraphAnalysis, Site, analyze, norm_scale_feeding
from stq_compiler.calibration.gptq import HessianAccumulator, gptq_quantize
from stq_compiler.calibration.sgat import fit_sgat
from stq_compiler.calibration.tac import TacParams, TacStatistics, tac_group_size
from stq_compiler.calibration.transforms import kronecker_factors, random_hadamard, smoothquant_scales
from stq_compiler.capture import keep_sources
from stq_compiler.ops import QuantizedWeight
from stq_compiler.passes.quantize_linears import eligible, quantize_linears, site_key
from stq_compiler.passes.token_state import insert_token_state
from stq_compiler.recipe import Recipe, fingerprint_from_model
from stq_compiler.site_transform import SiteTransform

METHODS = ("rtn", "smoothquant", "quarot", "starquant")
# SGAT minibatches are drawn as runs of this many consecutive tokens: nearly a token-level
# shuffle, yet each step copies contiguous rows (activations stay on the CPU).
SHUFFLE_RUN = 64


class CalibrationError(ValueError):
    pass


@dataclass
class CalibrationConfig:
    method: str = "starquant"
    w_bits: int = 4
    a_bits: int = 4
    mask_token_id: Optional[int] = None
    gptq: bool = False
    sgat: bool = True  # starquant: state gates on (False: one shared learned transform)
    tac: bool = True  # starquant: temporal attention compensation
    kron: bool = True  # starquant: P = P1 ⊗ P2 (False: dense P)
    init: str = "hadamard"  # starquant: P's starting point ("random": a random orthogonal, as the paper)
    epochs: int = 15
    lr: float = 1e-3
    batch_size: int = 4  # sequences per step (SGAT) and per forward (statistics)
    alpha: float = 0.5  # smoothquant migration strength
    tac_samples: int = 64
    trajectory_prompts: int = 2  # sequences whose sampler trajectory joins the calibration states
    trajectory_steps: int = 8
    seed: int = 0
    progress: bool = True
    max_blocks: Optional[int] = None  # fit only the first N blocks (timing benchmarks); the rest stay RTN
    extra: dict = field(default_factory=dict)

    def recipe_options(self) -> dict:
        options = {"gptq": self.gptq, "fold_norm": self.method != "rtn"}
        if self.method == "starquant":
            options.update(sgat=self.sgat, tac=self.tac, kron=self.kron, init=self.init, epochs=self.epochs, lr=self.lr)
        if self.method == "smoothquant":
            options["alpha"] = self.alpha
        return options


# ----------------------------------------------------------------------------------------------
# Calibration inputs


def _as_token_batches(data, tokenizer, seq_len: Optional[int]) -> torch.Tensor:
    """Token ids [N, L] from a LongTensor, a list of equal-length id tensors, or texts + tokenizer."""
    if isinstance(data, torch.Tensor):
        ids = data
    elif isinstance(data, Sequence) and data and isinstance(data[0], str):
        if tokenizer is None:
            raise CalibrationError("calibrate: texts need a tokenizer= to turn them into token ids")
        stream = [t for text in data for t in tokenizer(text)["input_ids"]]
        length = seq_len or 128
        if len(stream) < length:
            raise CalibrationError(f"calibrate: the texts give {len(stream)} tokens, fewer than one sequence of {length}")
        ids = torch.tensor(stream[: len(stream) // length * length]).reshape(-1, length)
    elif isinstance(data, Sequence) and data and all(isinstance(t, torch.Tensor) for t in data):
        lengths = {t.shape[-1] for t in data}
        if len(lengths) != 1:
            raise CalibrationError(f"calibrate: token-id tensors must share one length, got {sorted(lengths)}")
        ids = torch.cat([t.reshape(-1, t.shape[-1]) for t in data])
    else:
        raise CalibrationError("calibrate: data must be token ids [N, L], a list of id tensors, or texts with a tokenizer")
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        raise CalibrationError(f"calibrate: token ids must be a non-empty 2-D integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    if seq_len is not None:
        ids = ids[:, :seq_len]
    return ids.long()


def calibration_states(model, ids: torch.Tensor, cfg: CalibrationConfig, generator: torch.Generator) -> torch.Tensor:
    """Masked inputs [M, L]: one corruption per sequence at stratified mask ratios in (0, 1), then
    states along greedy sampler trajectories from the first ``trajectory_prompts`` sequences."""
    from stq_compiler.sampling import generate

    mask_id = cfg.mask_token_id
    n, length = ids.shape
    ratios = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=generator, dtype=torch.float64)) / n
    ratios = ratios[torch.randperm(n, generator=generator)]
    corrupt = torch.rand(n, length, generator=generator, dtype=torch.float64) < ratios[:, None]
    states = [torch.where(corrupt, torch.full_like(ids, mask_id), ids)]

    prompts = min(cfg.trajectory_prompts, n)
    gen_length = length // 2
    if prompts and gen_length >= 2:
        steps = min(cfg.trajectory_steps, gen_length)
        while gen_length % steps:
            steps -= 1
        seen = []

        class Recording(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner, self.config = inner, inner.config

            def forward(self, x):
                seen.append(x.cpu())
                return self.inner(x)

        device = next(model.parameters()).device
        generate(Recording(model), ids[:prompts, : length - gen_length].to(device), gen_length=gen_length, steps=steps,
                 block_length=gen_length, mask_token_id=mask_id)
        states.append(torch.cat(seen))
    return torch.cat(states)


def _batches(states: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Equal-size batches (the captured graph has static shapes): the last one is filled by wrapping."""
    m = states.shape[0]
    count = -(-m // batch_size)
    index = torch.arange(count * batch_size) % m
    return list(states[index].split(batch_size))


# ----------------------------------------------------------------------------------------------
# The captured graph, rewritten and instrumented


@dataclass
class _Captured:
    gm: fx.GraphModule
    example_inputs: list
    ids_index: int  # position of input_ids among the placeholders


def capture_model(model, example_ids: torch.Tensor) -> _Captured:
    graphs = []

    def record(gm, example_inputs, **_):
        graphs.append((keep_sources(gm), list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True, dynamic=False)(example_ids)
    torch._dynamo.reset()
    (gm, inputs), = graphs
    analysis = analyze(gm, inputs)
    if analysis.state_source is None:
        raise CalibrationError("calibrate: the model's graph has no input_ids read by an embedding; cannot see token states")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return _Captured(gm, inputs, placeholders.index(analysis.state_source))


class _Graph:
    """A fresh copy of the captured graph, analysed, with the token state inserted."""

    def __init__(self, captured: _Captured, mask_id: int):
        self.captured = captured
        self.gm = copy.deepcopy(captured.gm)
        self.analysis: GraphAnalysis = analyze(self.gm, captured.example_inputs)
        self.gm, _ = insert_token_state(self.gm, self.analysis.state_source, mask_id)
        self.state = self.gm.meta["stq_token_state"]

    def run(self, ids: torch.Tensor):
        args = list(self.captured.example_inputs)
        args[self.captured.ids_index] = ids.to(args[self.captured.ids_index].device)
        with torch.no_grad():
            return self.gm(*args)

    def observe(self, nodes: dict[str, fx.Node], sinks: Optional[dict] = None) -> dict[str, list]:
        """Insert an observer after each node. Without ``sinks`` each keeps what it sees (tokens ×
        features, float32, on the CPU) in the returned lists; with them, it hands each activation
        to ``sinks[key]`` instead (streaming statistics)."""
        seen = {}
        for i, (key, node) in enumerate(nodes.items()):
            store: list = []
            observer = _Observer(sinks[key] if sinks else lambda x, store=store: store.append(_to_host(x)))
            self.gm.add_submodule(f"stq_observer_{i}", observer)
            with self.gm.graph.inserting_after(node):
                self.gm.graph.call_module(f"stq_observer_{i}", (node,))
            seen[key] = store
        self.gm.recompile()
        return seen


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """An observed activation kept on the CPU in its own dtype (bf16 stays bf16: half the bytes of
    float32 to hold, and to move back to the GPU for training)."""
    return x.detach().cpu()


class _Observer(torch.nn.Module):
    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def forward(self, x: torch.Tensor) -> None:
        self.sink(x.detach().reshape(-1, x.shape[-1]))


def _blocks(analysis: GraphAnalysis, quantize_head: bool) -> list[list[Site]]:
    """Eligible sites in graph order, split before each q/k/v site (one transformer block each)."""
    order = {node: i for i, node in enumerate(analysis.sites[0].input.graph.nodes)} if analysis.sites else {}
    sites = sorted(
        (s for s in analysis.sites if all(eligible(lin, quantize_head) for lin in s.linears)),
        key=lambda s: min(order[lin.node] for lin in s.linears),
    )
    blocks: list[list[Site]] = []
    for site in sites:
        if not blocks or site.role == "qkv":
            blocks.append([])
        blocks[-1].append(site)
    return blocks


def _activation_node(site: Site, fold_norm: bool, bindings) -> tuple[fx.Node, Optional[torch.Tensor]]:
    if fold_norm:
        feed = norm_scale_feeding(site.input, bindings)
        if feed is not None:
            return feed[0], feed[1].tensor
    return site.input, None


# ----------------------------------------------------------------------------------------------
# Per-site fits


def _fit_site(site: Site, x: torch.Tensor, state: torch.Tensor, norm_weight, cfg: CalibrationConfig, gen) -> tuple[Optional[SiteTransform], dict]:
    """Fit one site's transform from its activations ``x`` [T, d] (CPU) and token states."""
    fold = norm_weight is not None
    weights = [lin.weight_nk().float() * (norm_weight.detach().float() if fold else 1) for lin in site.linears]
    d = x.shape[-1]
    if cfg.method == "rtn":
        return None, {}
    if cfg.method == "smoothquant":
        act_absmax = x.abs().amax(0).double()
        w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).double()
        s = smoothquant_scales(act_absmax, w_absmax, cfg.alpha)
        return SiteTransform(fold_norm=fold, smooth=s), {}
    if cfg.method == "quarot":
        d1, d2 = kronecker_factors(d)
        signs = torch.randint(0, 2, (d,), generator=gen).double() * 2 - 1
        return SiteTransform(fold_norm=fold, smooth=signs, p1=random_hadamard(d1, gen), p2=random_hadamard(d2, gen)), {}
    transform, report = fit_sgat(
        x, state, weights, cfg.w_bits, cfg.a_bits, gates=cfg.sgat, kron=cfg.kron, init=cfg.init, epochs=cfg.epochs, lr=cfg.lr,
        tokens_per_step=cfg.batch_size * cfg.extra["seq_len"], sequence=SHUFFLE_RUN, generator=gen, fold_norm=fold,
    )
    return transform, report


def _gptq_weights(site: Site, transform: Optional[SiteTransform], x: torch.Tensor, state: torch.Tensor, norm_weight, w_bits: int) -> dict[str, QuantizedWeight]:
    """GPTQ codes of the site's folded weights, with the Hessian of the transformed activations."""
    device = site.linears[0].weight.tensor.device
    hessian = HessianAccumulator(x.shape[-1])
    for i in range(0, x.shape[0], 65536):  # in chunks: x stays on the CPU
        chunk = x[i : i + 65536].to(device)
        hessian.update(transform.transform_activation(chunk, state[i : i + 65536].to(device)) if transform is not None else chunk)
    h = hessian.hessian()
    out = {}
    for lin in site.linears:
        folded = transform.fold_weight(lin.weight_nk(), norm_weight) if transform is not None else lin.weight_nk().float()
        out[lin.fqn] = gptq_quantize(folded.to(device), h, w_bits)
    return out


# ----------------------------------------------------------------------------------------------


def calibrate(
    model: torch.nn.Module,
    data,
    method: str = "starquant",
    w_bits: int = 4,
    a_bits: int = 4,
    *,
    tokenizer=None,
    mask_token_id: Optional[int] = None,
    seq_len: Optional[int] = None,
    quantize_head: bool = False,
    **method_options,
) -> Recipe:
    """Calibrate ``model`` on ``data`` with ``method`` and return the recipe the backend applies.

    ``method_options``: ``gptq`` (all methods), ``sgat``, ``tac``, ``kron``, ``epochs``, ``lr``
    (starquant), ``alpha`` (smoothquant), ``batch_size``, ``tac_samples``, ``trajectory_prompts``,
    ``trajectory_steps``, ``seed``, ``progress``.
    """
    if method not in METHODS:
        raise CalibrationError(f"calibrate: unknown method {method!r}; choose one of {METHODS}")
    for name, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
        if bits not in (4, 8):
            raise CalibrationError(f"calibrate: {name}={bits} is not supported; choose 4 or 8")
    known = set(CalibrationConfig.__dataclass_fields__) - {"method", "w_bits", "a_bits", "mask_token_id", "extra"}
    unknown = set(method_options) - known
    if unknown:
        raise CalibrationError(f"calibrate: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    if mask_token_id is None:
        mask_token_id = getattr(getattr(model, "config", None), "mask_token_id", None)
    if mask_token_id is None:
        raise CalibrationError("calibrate: no mask token id: pass mask_token_id= or set model.config.mask_token_id")
    cfg = CalibrationConfig(method=method, w_bits=w_bits, a_bits=a_bits, mask_token_id=mask_token_id, **method_options)
    gen = torch.Generator().manual_seed(cfg.seed)
    timing: dict = {}
    clock = time.perf_counter()

    ids = _as_token_batches(data, tokenizer, seq_len)
    cfg.extra["seq_len"] = ids.shape[1]
    model = model.eval()
    with torch.no_grad():
        states = calibration_states(model, ids, cfg, gen)
    batches = _batches(states, cfg.batch_size)
    timing["states_s"], clock = time.perf_counter() - clock, time.perf_counter()
    captured = capture_model(model, batches[0].to(next(model.parameters()).device))
    timing["capture_s"], clock = time.perf_counter() - clock, time.perf_counter()
    fold_norm = cfg.recipe_options()["fold_norm"]

    transforms: dict[str, SiteTransform] = {}
    weights: dict[str, QuantizedWeight] = {}
    reports: dict[str, dict] = {}
    fitted: set[str] = set()
    needs_statistics = method != "rtn" or cfg.gptq
    blocks = _blocks(_Graph(captured, mask_token_id).analysis, quantize_head) if needs_statistics else []
    if cfg.max_blocks is not None:
        blocks = blocks[: cfg.max_blocks]
    timing["blocks_s"] = []
    progress = tqdm(total=sum(len(b) for b in blocks), desc=f"calibrate {method} W{w_bits}A{a_bits}", unit="site", disable=not cfg.progress)
    for block in blocks:
        keys = [site_key(s) for s in block]
        graph = _Graph(captured, mask_token_id)
        _quantize_fitted(graph, fitted, transforms, weights, cfg, quantize_head)
        sites = {site_key(s): s for s in graph.analysis.sites if site_key(s) in keys}
        nodes, norms = {}, {}
        for key, site in sites.items():
            nodes[key], norms[key] = _activation_node(site, fold_norm, graph.analysis.bindings)
        seen = graph.observe(nodes)
        for batch in batches:
            graph.run(batch)
        state = torch.cat([b.reshape(-1) == mask_token_id for b in batches])
        for key, site in sites.items():
            x = torch.cat(seen[key])
            transform, report = _fit_site(site, x, state, norms[key], cfg, gen)
            if transform is not None:
                transforms[key] = transform
            if cfg.gptq:
                weights.update(_gptq_weights(site, transform, x, state, norms[key], w_bits))
            reports[key] = report
            fitted.add(key)
            progress.update(1)
        timing["blocks_s"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
    progress.close()

    tensors: dict[str, torch.Tensor] = {}
    for key, transform in transforms.items():
        tensors.update({Recipe.key(key, f"site.{name}"): t.float() for name, t in transform.to_tensors().items()})
    for fqn, qw in weights.items():
        tensors[Recipe.key(fqn, "w.q")] = qw.q
        tensors[Recipe.key(fqn, "w.scale")] = qw.scale
    if method == "starquant" and cfg.tac:
        for fqn, params in fit_tac_layers(captured, transforms, weights, batches, cfg, quantize_head).items():
            tensors[Recipe.key(fqn, "tac.M")] = params.M
            tensors[Recipe.key(fqn, "tac.d")] = params.d
        timing["tac_s"] = time.perf_counter() - clock
    options = cfg.recipe_options()
    options["quantize_head"] = quantize_head
    options["timing"] = timing
    if cfg.max_blocks is not None:
        options["max_blocks"] = cfg.max_blocks
    fitted_losses = {k: r for k, r in reports.items() if r}
    if fitted_losses:  # what training did, per site (normalised layer loss, first and last epoch)
        options["sgat_loss"] = fitted_losses
    return Recipe(
        method=method, w_bits=w_bits, a_bits=a_bits, mask_token_id=mask_token_id, options=options,
        tensors=tensors, fingerprint=fingerprint_from_model(model),
    )


def _quantize_fitted(graph: _Graph, keys: set, transforms, weights, cfg: CalibrationConfig, quantize_head: bool, quantize: bool = True) -> None:
    """Rewrite the sites in ``keys`` of ``graph`` with their fitted transforms, quantized (or not)."""
    full = graph.analysis
    subset = GraphAnalysis(full.bindings, full.linears, [s for s in full.sites if site_key(s) in keys], full.attention, full.state_source, full.roles)
    quantize_linears(graph.gm, subset, cfg.w_bits, cfg.a_bits, graph.state, quantize_head, transforms, weights, quantize=quantize)


def fit_tac_layers(captured: _Captured, transforms, weights, batches, cfg: CalibrationConfig, quantize_head: bool) -> dict[str, TacParams]:
    """TAC per attention layer from ≤ ``tac_samples`` inputs: the TAC point seen with every transform
    on and quantizers off (reference) and on (quantized), accumulated as streaming statistics."""
    samples = max(1, cfg.tac_samples // cfg.batch_size)
    stats: dict[str, TacStatistics] = {}
    for side, quantize in (("ref", False), ("q", True)):
        graph = _Graph(captured, cfg.mask_token_id)
        keys = {site_key(s) for s in graph.analysis.sites}
        points = {core.output_projection.fqn: core.tac_point for core in graph.analysis.attention if core.output_projection}
        for fqn, proj in ((c.output_projection.fqn, c.output_projection) for c in graph.analysis.attention if c.output_projection):
            stats.setdefault(fqn, TacStatistics(proj.in_features, tac_group_size(proj.in_features)))
        _quantize_fitted(graph, keys, transforms, weights, cfg, quantize_head, quantize)
        # observe the TAC point itself (the o-projection's site now reads a transformed input)
        graph.observe(points, {fqn: (lambda z, s=stats[fqn], side=side: s.add(side, z)) for fqn in points})
        for batch in batches[:samples]:
            graph.run(batch)
    return {fqn: s.fit() for fqn, s in stats.items()}
