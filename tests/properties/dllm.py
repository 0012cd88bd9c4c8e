"""Random small DLLMs for the property tests: configurations, token batches, captured graphs.

A configuration is drawn over the four architectures, 1–2 layers, hidden sizes from small
multiples (heads × head_dim), grouped-query attention, and bias where the architecture has it
(Dream/Qwen2: q/k/v bias always; Llama: ``attention_bias`` and ``mlp_bias`` on or off; LLaDA: none).
Norm weights and biases are randomised so that folding them wrongly shows.

Captures are cached per (configuration, batch shape): a Dynamo graph is static in the token values,
so one capture serves every mask pattern of that shape, and each test works on a deep copy.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from functools import lru_cache

import torch
from hypothesis import strategies as st

from stq_compiler.analysis import analyze, norm_scale_feeding
from stq_compiler.passes.quantize_linears import site_key
from stq_compiler.site_transform import SiteTransform
from tests.conftest import ARCHS, capture_graphs, tiny_model

MASK_ID = 255  # build_tiny's mask token id (vocabulary 256), every architecture
MASK_PATTERNS = ("none", "all", "random", "suffix")


@dataclass(frozen=True)
class TinyConfig:
    arch: str
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    mlp_ratio: int = 2
    bias: bool = False  # llama only: attention_bias and mlp_bias
    seed: int = 0

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def overrides(self) -> dict:
        if self.arch == "llada":
            return dict(
                d_model=self.hidden, n_heads=self.heads, n_kv_heads=self.kv_heads, n_layers=self.layers,
                mlp_hidden_size=self.mlp_ratio * self.hidden,
            )
        fields = dict(
            hidden_size=self.hidden, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            num_hidden_layers=self.layers, intermediate_size=self.mlp_ratio * self.hidden,
        )
        if self.arch == "llama":
            fields.update(attention_bias=self.bias, mlp_bias=self.bias, head_dim=self.head_dim)
        return fields

    def build(self) -> torch.nn.Module:
        """A fresh model; the same weights every call."""
        model = tiny_model(self.arch, seed=self.seed, **self.overrides())
        gen = torch.Generator().manual_seed(self.seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() == 1 and "norm" in name:
                    param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
                elif name.endswith(".bias"):
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        return model


@st.composite
def tiny_configs(draw, archs=ARCHS):
    arch = draw(st.sampled_from(archs))
    heads = draw(st.sampled_from([1, 2, 4]))
    return TinyConfig(
        arch=arch,
        layers=draw(st.integers(1, 2)),
        heads=heads,
        kv_heads=draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
        head_dim=draw(st.sampled_from([8, 12, 16])),
        mlp_ratio=draw(st.integers(1, 3)),
        bias=arch == "llama" and draw(st.booleans()),
        seed=draw(st.integers(0, 3)),
    )


batch_shapes = st.tuples(st.integers(1, 3), st.integers(1, 12))
mask_patterns = st.sampled_from(MASK_PATTERNS)


def make_ids(shape, pattern: str, seed: int) -> torch.Tensor:
    """Token ids of ``shape`` with the mask token where ``pattern`` says (a prompt, then masks: "suffix")."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK_ID, shape, generator=gen)
    if pattern == "all":
        ids[:] = MASK_ID
    elif pattern == "random":
        ids[torch.rand(shape, generator=gen) < 0.5] = MASK_ID
    elif pattern == "suffix":
        ids[:, torch.randint(0, shape[1] + 1, (), generator=gen).item():] = MASK_ID
    return ids


@dataclass
class Captured:
    """One Dynamo graph of a model, its example inputs, and where input_ids goes among them."""

    config: TinyConfig
    model: torch.nn.Module
    gm: torch.fx.GraphModule
    inputs: list
    ids_index: int

    def fresh(self):
        """A deep copy of the graph, its analysis, and the example inputs: what a pass may change."""
        gm = copy.deepcopy(self.gm)
        return gm, analyze(gm, self.inputs), list(self.inputs)

    def inputs_with(self, ids: torch.Tensor) -> list:
        inputs = list(self.inputs)
        inputs[self.ids_index] = ids
        return inputs


def capture_fresh(config: TinyConfig, shape) -> Captured:
    """A new Dynamo capture (no cache)."""
    model = config.build()
    ids = make_ids(shape, "random", 0)
    (gm, inputs), = capture_graphs(model, ids)
    state_source = analyze(gm, inputs).state_source
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return Captured(config, model, gm, inputs, placeholders.index(state_source))


@lru_cache(maxsize=16)
def captured(config: TinyConfig, shape) -> Captured:
    """The capture of ``config`` at token batch ``shape``, shared by every test (copy before changing)."""
    return capture_fresh(config, tuple(shape))


def run_graph(gm, inputs) -> tuple:
    with torch.no_grad():
        out = gm(*inputs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# ---------------------------------------------------------------------------------------------
# random site transforms


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def square_factors(d: int) -> tuple[int, int]:
    d1 = max(i for i in range(1, int(d**0.5) + 1) if d % i == 0)
    return d1, d // d1


def random_gates(d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SGAT-style gates: disjoint private columns, zeroed in the other state's gate."""
    order = torch.randperm(d, generator=gen)
    private = max(1, d // 8)
    gate_m, gate_u = torch.ones(d), torch.ones(d)
    if d >= 2:
        gate_m[order[:private]] = 0  # private to unmasked tokens
        gate_u[order[private : 2 * private]] = 0  # private to masked tokens
    return gate_m, gate_u


def random_transforms(analysis, seed: int, gates: str = "ones", share: float = 0.8) -> dict[str, SiteTransform]:
    """A random SiteTransform for about ``share`` of the sites, each with a random choice of its
    parts: norm fold (where a norm feeds the site), smoothing, rotation (Kronecker or dense, or
    none), and gates ("none", "ones": all-ones gates, exact; "random": SGAT-style private columns)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    transforms = {}
    for site in analysis.sites:
        if rng.random() > share:
            continue
        d = site.linears[0].in_features
        rotation = rng.choice(["kron", "dense", "none"])
        d1, d2 = square_factors(d) if rotation == "kron" else (d, 1)
        t = SiteTransform(
            fold_norm=norm_scale_feeding(site.input, analysis.bindings) is not None and rng.random() < 0.7,
            smooth=torch.rand(d, generator=gen, dtype=torch.float64) * 4 + 0.25 if rng.random() < 0.7 else None,
            p1=random_orthogonal(d1, gen) if rotation != "none" else None,
            p2=random_orthogonal(d2, gen) if rotation != "none" else None,
        )
        if gates == "ones":
            t.gate_masked, t.gate_unmasked = torch.ones(d), torch.ones(d)
        elif gates == "random":
            t.gate_masked, t.gate_unmasked = random_gates(d, gen)
        transforms[site_key(site)] = t
    return transforms
