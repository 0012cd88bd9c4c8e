"""``calibrate(model, data, method=...) -> Recipe``: fit a method's per-site transforms (and TAC).

The model is captured once the way the backend sees it (Dynamo, one graph, traced without
running it), analysed for its sites, attention cores and token-state source, cut into one piece
per transformer block (``stream.py``), and then calibrated block by block, streamed: block b's
piece runs on the tensors crossing into it (kept per calibration batch on the host) with
observers at its sites, its sites are fitted from what they saw, and it runs again quantized
with that fit, which hands block b+1 its inputs. So each block's inputs come from the
already-quantized blocks before it, each block runs twice in all, and only its parameters are on
the device while it is processed. TAC (STaR-Quant) is fitted last, streamed the same way with
every transform on, quantizers off ("reference") and on ("quantized").

Calibration inputs follow how a diffusion LLM is used: masked-diffusion corruptions of the
calibration sequences at mask ratios spread over (0, 1), and the states along real sampler
trajectories (``stq_compiler.generate``) started from the sequences' first halves.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from stq_compiler.analysis import GraphAnalysis, Site, analyze, norm_scale_feeding
from stq_compiler.calibration.gptq import HessianAccumulator, gptq_quantize
from stq_compiler.calibration.sgat import fit_sgat
from stq_compiler.calibration.stream import BoundaryStream, Piece, annotate_pieces, boundary_outputs, extract_piece, pieces_of
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
    sgat_select: bool = True  # starquant: per site, the state gates only where they lower the trained loss on the calibration tokens (benchmarks/explore/ranking.py)
    sgat_retrain: bool = False  # starquant, with sgat_select: a site that drops its gates trains a P for none
    tac: bool = True  # starquant: temporal attention compensation
    tac_select: bool = False  # starquant: per TAC block, the fitted map only where it lowers the calibration error, else identity
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
    device: Optional[str] = None  # where to compute (default: the model's); the weights may stay on the host
    resident_gb: float = 12.0  # a site's activations up to this size train from the device, larger ones from the host
    extra: dict = field(default_factory=dict)

    def recipe_options(self) -> dict:
        options = {"gptq": self.gptq, "fold_norm": self.method != "rtn"}
        if self.method == "starquant":
            options.update(sgat=self.sgat, sgat_select=self.sgat_select, sgat_retrain=self.sgat_retrain, tac=self.tac, tac_select=self.tac_select, kron=self.kron, init=self.init, epochs=self.epochs, lr=self.lr)
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


def calibration_states(model, ids: torch.Tensor, cfg: CalibrationConfig, generator: torch.Generator, device=None) -> torch.Tensor:
    """Masked inputs [M, L]: one corruption per sequence at stratified mask ratios in (0, 1), then
    states along greedy sampler trajectories from the first ``trajectory_prompts`` sequences
    (sampled on ``device``, default the model's, even when the model's weights are elsewhere)."""
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

        device = torch.device(device) if device is not None else next(model.parameters()).device
        with _weights_on(model, device):
            generate(Recording(model), ids[:prompts, : length - gen_length].to(device), gen_length=gen_length, steps=steps,
                     block_length=gen_length, mask_token_id=mask_id)
        states.append(torch.cat(seen))
    return torch.cat(states)


class _WeightsOnDemand(TorchFunctionMode):
    """Run a model whose weights stay on the host on ``device``: every op moves the parameters and
    buffers it reads there (per op, not per module as offloading usually does, so that tied weights
    and weights read outside their module's forward work too). Attribute reads (``.shape``,
    ``.device``) move nothing."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.device = device
        self.held = {id(t) for t in (*model.parameters(), *model.buffers()) if t.device != device}

    def _move(self, t):
        return t.to(self.device) if isinstance(t, torch.Tensor) and id(t) in self.held else t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "__get__":
            args, kwargs = tree_map(self._move, (args, kwargs))
        return func(*args, **kwargs)


def _weights_on(model: torch.nn.Module, device: torch.device):
    held = any(t.device != device for t in (*model.parameters(), *model.buffers()))
    return _WeightsOnDemand(model, device) if held else contextlib.nullcontext()


def _batches(states: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Equal-size batches (the captured graph has static shapes): the last one is filled by wrapping."""
    m = states.shape[0]
    count = -(-m // batch_size)
    index = torch.arange(count * batch_size) % m
    return list(states[index].split(batch_size))


# ----------------------------------------------------------------------------------------------
# The captured graph, cut into one piece per transformer block, rewritten and instrumented


@dataclass
class _Captured:
    gm: fx.GraphModule  # nodes marked with their piece (stream.annotate_pieces)
    example_inputs: list  # placeholder values: the model's parameters where it keeps them
    ids_index: int  # position of input_ids among the placeholders
    device: torch.device  # where calibration computes
    pieces: int = 1
    reads: list = field(default_factory=list)  # per piece, the placeholders it reads
    outputs: list = field(default_factory=list)  # per piece, its tensors later pieces read
    last_reader: dict = field(default_factory=dict)  # per boundary tensor, the last piece reading it

    def partition(self, blocks: list[list[Site]], bindings) -> None:
        """Cut the graph between the transformer ``blocks`` (streamed calibration, stream.py)."""
        def observable(site: Site) -> list[fx.Node]:
            feed = norm_scale_feeding(site.input, bindings)
            return [site.input] + ([feed[0]] if feed is not None else [])

        self.pieces = annotate_pieces(self.gm, [[([lin.node for lin in s.linears], observable(s)) for s in b] for b in blocks])
        self.outputs, self.last_reader = boundary_outputs(self.gm, self.pieces)
        piece_of = pieces_of(self.gm)
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        self.reads = [[i for i, ph in enumerate(placeholders) if any(piece_of.get(u) == p for u in ph.users)] for p in range(self.pieces)]

    def inputs_on_device(self, piece: int) -> list:
        """The placeholder values with those piece ``piece`` reads on the device (its parameters)."""
        inputs = list(self.example_inputs)
        for i in self.reads[piece]:
            if isinstance(inputs[i], torch.Tensor):
                inputs[i] = inputs[i].detach().to(self.device)
        return inputs


class _Recorded(Exception):
    """Raised by the capture backend once it holds the graph: capture never runs the whole model."""


def capture_model(model, example_ids: torch.Tensor, device: torch.device) -> _Captured:
    """The model's one Dynamo graph, traced where the model's weights are and set to compute on
    ``device`` (device constants the trace baked in, e.g. ``arange(device=...)``, are moved)."""
    graphs = []

    def record(gm, example_inputs, **_):
        keep_sources(gm)
        for node in gm.graph.nodes:  # Dynamo's grapharg holds the real tensor: no deep copies of it
            node.meta.pop("grapharg", None)
        graphs.append((gm, list(example_inputs)))
        raise _Recorded

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=record, fullgraph=True, dynamic=False)(example_ids)
    except Exception:  # Dynamo wraps what the backend raises
        if not graphs:
            raise
    finally:
        torch._dynamo.reset()
    (gm, inputs), = graphs
    _retarget_devices(gm, example_ids.device, device)
    analysis = analyze(gm, inputs)
    if analysis.state_source is None:
        raise CalibrationError("calibrate: the model's graph has no input_ids read by an embedding; cannot see token states")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return _Captured(gm, inputs, placeholders.index(analysis.state_source), device)


def _retarget_devices(gm: fx.GraphModule, source: torch.device, target: torch.device) -> None:
    if source == target:
        return

    def swap(a):
        return target if isinstance(a, torch.device) and a == source else a

    for node in gm.graph.nodes:
        node.args, node.kwargs = fx.node.map_aggregate(node.args, swap), fx.node.map_aggregate(node.kwargs, swap)
    gm.recompile()


class _Graph:
    """A fresh copy of the captured graph, analysed with ``inputs`` (default: the captured
    example inputs), with the token state inserted."""

    def __init__(self, captured: _Captured, mask_id: int, inputs: Optional[list] = None):
        self.captured = captured
        self.inputs = captured.example_inputs if inputs is None else inputs
        self.gm = copy.deepcopy(captured.gm)
        self.analysis: GraphAnalysis = analyze(self.gm, self.inputs)
        self.gm, _ = insert_token_state(self.gm, self.analysis.state_source, mask_id)
        self.state = self.gm.meta["stq_token_state"]

    def piece(self, index: int, advance: bool) -> Piece:
        """Piece ``index`` as a module; it returns what later pieces read when ``advance``."""
        return extract_piece(self.gm, index, self.captured.outputs[index] if advance else [], self.state)

    def sites_in(self, piece: int) -> list[Site]:
        piece_of = pieces_of(self.gm)
        return [s for s in self.analysis.sites if piece_of[s.linears[0].node] == piece]

    def observe(self, nodes: dict[str, fx.Node], sinks: Optional[dict] = None) -> dict[str, list]:
        """Insert an observer after each node. Without ``sinks`` each keeps what it sees (tokens ×
        features, in its dtype, on the host) in the returned lists; with them, it hands each activation
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
    float32 to hold, and to move back to the GPU for training); pinned when it comes from a GPU,
    so both copies run at the bus's speed."""
    if x.device.type != "cuda":
        return x.detach().cpu()
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x.detach())


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
    """Fit one site's transform from its activations ``x`` [T, d] (on the host, or on the device when they fit) and token states."""
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
        gate_select=cfg.sgat_select, gate_retrain=cfg.sgat_retrain,
    )
    return transform, report


def _site_activations(chunks: list[torch.Tensor], device: torch.device, budget_gb: float) -> torch.Tensor:
    """The observed chunks as one [T, d] tensor: on the device when it fits ``budget_gb`` (SGAT then
    draws its minibatches there, not through host gathers and copies, which are most of a training
    step's time at 8B sizes otherwise), on the host otherwise."""
    nbytes = sum(c.numel() * c.element_size() for c in chunks)
    if device.type == "cpu" or nbytes > budget_gb * 2**30:
        return torch.cat(chunks)
    x = torch.empty((sum(c.shape[0] for c in chunks), chunks[0].shape[-1]), dtype=chunks[0].dtype, device=device)
    row = 0
    for c in chunks:
        x[row : row + c.shape[0]].copy_(c, non_blocking=True)
        row += c.shape[0]
    return x


def _gptq_weights(site: Site, transform: Optional[SiteTransform], x: torch.Tensor, state: torch.Tensor, norm_weight, w_bits: int) -> dict[str, QuantizedWeight]:
    """GPTQ codes of the site's folded weights, with the Hessian of the transformed activations."""
    device = site.linears[0].weight.tensor.device
    hessian = HessianAccumulator(x.shape[-1])
    for i in range(0, x.shape[0], 65536):  # in chunks: x may be on the host
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

    ``method_options``: ``gptq`` (all methods), ``sgat``, ``sgat_select``, ``sgat_retrain``, ``tac``, ``tac_select``, ``kron``,
    ``epochs``, ``lr`` (starquant), ``alpha`` (smoothquant), ``batch_size``, ``tac_samples``, ``trajectory_prompts``,
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
    device = torch.device(cfg.device) if cfg.device is not None else next(model.parameters()).device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    timing: dict = {}
    clock = time.perf_counter()

    ids = _as_token_batches(data, tokenizer, seq_len)
    cfg.extra["seq_len"] = ids.shape[1]
    model = model.eval()
    with torch.no_grad():
        states = calibration_states(model, ids, cfg, gen, device)
    batches = _batches(states, cfg.batch_size)
    timing["states_s"], clock = time.perf_counter() - clock, time.perf_counter()
    captured = capture_model(model, batches[0].to(next(model.parameters()).device), device)
    analysis = analyze(captured.gm, captured.example_inputs)
    blocks = _blocks(analysis, quantize_head)
    captured.partition(blocks, analysis.bindings)
    timing["capture_s"], clock = time.perf_counter() - clock, time.perf_counter()

    if method == "rtn" and not cfg.gptq:
        blocks = []  # nothing to observe
    if cfg.max_blocks is not None:
        blocks = blocks[: cfg.max_blocks]
    transforms, weights, reports = _fit_blocks(captured, [[site_key(s) for s in b] for b in blocks], batches, cfg, quantize_head, gen, timing)
    clock = time.perf_counter()

    tensors: dict[str, torch.Tensor] = {}
    for key, transform in transforms.items():
        tensors.update({Recipe.key(key, f"site.{name}"): t.float().cpu() for name, t in transform.to_tensors().items()})
    for fqn, qw in weights.items():
        tensors[Recipe.key(fqn, "w.q")] = qw.q.cpu()
        tensors[Recipe.key(fqn, "w.scale")] = qw.scale.cpu()
    tac_kept: dict[str, list] = {}
    if method == "starquant" and cfg.tac:
        for fqn, params in fit_tac_layers(captured, transforms, weights, batches, cfg, quantize_head, tac_kept).items():
            tensors[Recipe.key(fqn, "tac.M")] = params.M
            tensors[Recipe.key(fqn, "tac.d")] = params.d
        timing["tac_s"] = time.perf_counter() - clock
    options = cfg.recipe_options()
    if tac_kept:  # per layer, the TAC blocks that kept the fitted map (tac_select)
        options["tac_kept"] = tac_kept
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


def _fit_blocks(captured: _Captured, blocks: list[list[str]], batches, cfg: CalibrationConfig, quantize_head: bool, gen, timing: dict):
    """Fit each block's sites (keys in ``blocks``) in order, streamed: block b's piece runs float on
    the boundary tensors with observers at its sites, its sites are fitted, and then it runs again
    quantized with what was fitted, which hands block b+1 its inputs. Returns (transforms, GPTQ
    weights, fit reports); ``timing["blocks"]`` gets each block's phases."""
    transforms: dict[str, SiteTransform] = {}
    weights: dict[str, QuantizedWeight] = {}
    reports: dict[str, dict] = {}
    mask_id, fold_norm = cfg.mask_token_id, cfg.recipe_options()["fold_norm"]
    stream = BoundaryStream(batches, captured.ids_index, captured.device, captured.last_reader)
    state = torch.cat([b.reshape(-1) == mask_id for b in batches])
    timing["blocks_s"], timing["blocks"] = [], []
    progress = tqdm(total=len(blocks), desc=f"calibrate {cfg.method} W{cfg.w_bits}A{cfg.a_bits}", unit="block", disable=not cfg.progress)
    for b, keys in enumerate(blocks):
        phases, clock = {}, time.perf_counter()
        progress.set_postfix_str("statistics")
        inputs = captured.inputs_on_device(b)  # this block's parameters, on the device for now
        graph = _Graph(captured, mask_id, inputs)
        sites = {site_key(s): s for s in graph.analysis.sites if site_key(s) in keys}
        nodes, norms = {}, {}
        for key, site in sites.items():
            nodes[key], norms[key] = _activation_node(site, fold_norm, graph.analysis.bindings)
        seen = graph.observe(nodes)
        piece = graph.piece(b, advance=False)
        phases["graph_s"], clock = time.perf_counter() - clock, time.perf_counter()
        stream.run(piece, inputs, advance=False)
        phases["statistics_s"], clock = time.perf_counter() - clock, time.perf_counter()
        for key, site in sites.items():
            progress.set_postfix_str(f"fit {site.name}")
            x = _site_activations(seen.pop(key), captured.device, cfg.resident_gb)
            transform, report = _fit_site(site, x, state, norms[key], cfg, gen)
            if transform is not None:
                transforms[key] = transform
            if cfg.gptq:
                weights.update(_gptq_weights(site, transform, x, state, norms[key], cfg.w_bits))
            reports[key] = report
            del x
        phases["fit_s"], clock = time.perf_counter() - clock, time.perf_counter()
        if b + 1 < len(blocks):  # block b quantized with its fit: block b+1's inputs
            progress.set_postfix_str("quantized forward")
            graph = _Graph(captured, mask_id, inputs)
            _quantize_fitted(graph, set(keys), transforms, weights, cfg, quantize_head)
            piece = graph.piece(b, advance=True)
            phases["graph_s"] += time.perf_counter() - clock
            clock = time.perf_counter()
            stream.run(piece, inputs, advance=True)
            phases["quantized_forward_s"] = time.perf_counter() - clock
        del graph, piece, inputs
        timing["blocks_s"].append(sum(phases.values()))
        if captured.device.type == "cuda":  # the peak so far (the caller may reset it)
            phases["peak_gpu_gb"] = torch.cuda.max_memory_allocated(captured.device) / 2**30
        timing["blocks"].append(phases)
        progress.update(1)
    progress.close()
    return transforms, weights, reports


def _quantize_fitted(graph: _Graph, keys: set, transforms, weights, cfg: CalibrationConfig, quantize_head: bool, quantize: bool = True) -> None:
    """Rewrite the sites in ``keys`` of ``graph`` with their fitted transforms, quantized (or not)."""
    full = graph.analysis
    subset = GraphAnalysis(full.bindings, full.linears, [s for s in full.sites if site_key(s) in keys], full.attention, full.state_source, full.roles)
    quantize_linears(graph.gm, subset, cfg.w_bits, cfg.a_bits, graph.state, quantize_head, transforms, weights, quantize=quantize)


def fit_tac_layers(captured: _Captured, transforms, weights, batches, cfg: CalibrationConfig, quantize_head: bool,
                   kept: Optional[dict] = None) -> dict[str, TacParams]:
    """TAC per attention layer from ≤ ``tac_samples`` inputs, layer by layer: the TAC point seen with
    every transform on and quantizers off (reference) and on (quantized), accumulated as streaming
    statistics. Streamed like the SGAT fit, with two boundary streams (reference, quantized); the
    quantized stream goes on through each block with that block's TAC applied, so every layer's
    TAC is fitted on the inputs it will see, the earlier layers' TAC active.

    With ``cfg.tac_select`` the two sides are paired token by token (the reference side's TAC-point
    tensors wait on the host for the quantized side's: one layer's ``tac_samples`` sequences) and
    each block keeps its fitted map only where it lowers the calibration error; ``kept`` gets, per
    layer, which blocks did."""
    from stq_compiler.passes.tac import insert_tac

    batches = batches[: max(1, cfg.tac_samples // cfg.batch_size)]
    streams = {side: BoundaryStream(batches, captured.ids_index, captured.device, captured.last_reader) for side in ("ref", "q")}
    fitted: dict[str, TacParams] = {}
    progress = tqdm(total=captured.pieces, desc="calibrate TAC", unit="block", disable=not cfg.progress)
    for b in range(captured.pieces):
        inputs = captured.inputs_on_device(b)
        advance = b + 1 < captured.pieces
        stats: dict[str, TacStatistics] = {}
        waiting: dict[str, list] = {}  # tac_select: reference-side tensors, in batch order

        def sink(fqn: str, side: str):
            s = stats[fqn]
            if not cfg.tac_select:
                return lambda z: s.add(side, z)
            if side == "ref":
                return lambda z: waiting.setdefault(fqn, []).append(_to_host(z))
            return lambda z: s.update(waiting[fqn].pop(0), z)

        def block_graph(quantize: bool, tac: Optional[dict] = None) -> tuple[_Graph, list]:
            graph = _Graph(captured, cfg.mask_token_id, inputs)
            piece_of = pieces_of(graph.gm)
            cores = [c.output_projection for c in graph.analysis.attention if c.output_projection and piece_of[c.output_projection.node] == b]
            if tac:
                insert_tac(graph.gm, graph.analysis, tac)
            _quantize_fitted(graph, {site_key(s) for s in graph.sites_in(b)}, transforms, weights, cfg, quantize_head, quantize)
            return graph, cores

        for side, quantize in (("ref", False), ("q", True)):
            graph, cores = block_graph(quantize)
            for proj in cores:
                stats.setdefault(proj.fqn, TacStatistics(proj.in_features, tac_group_size(proj.in_features)))
            # observe the TAC point itself (the o-projection's site now reads a transformed input)
            points = {proj.fqn: proj.input for proj in cores}
            graph.observe(points, {fqn: sink(fqn, side) for fqn in points})
            # the quantized stream moves on only once this block's TAC is in place (below)
            streams[side].run(graph.piece(b, advance and (side == "ref" or not cores)), inputs, advance and (side == "ref" or not cores))
        block_tac = {fqn: s.fit() for fqn, s in stats.items()}
        if cfg.tac_select:
            for fqn, s in stats.items():
                block_tac[fqn], keep = s.keep_where_better(block_tac[fqn])
                if kept is not None:
                    kept[fqn] = keep.tolist()
        fitted.update(block_tac)
        if advance and block_tac:
            graph, _ = block_graph(True, block_tac)
            streams["q"].run(graph.piece(b, True), inputs, True)
        progress.update(1)
    progress.close()
    return fitted
