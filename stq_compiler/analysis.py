"""Analysis: recognise linears, activation sites, attention cores and TAC points in an FX graph.

Works from graph patterns only, never from module names:

* a **linear** is ``linear(x, W[, b])`` or ``x @ Wᵀ`` / ``matmul(x, Wᵀ)`` (``t``, ``T``,
  ``transpose``, ``permute``), or ``x @ W`` with a stored ``[in, out]`` weight, where ``W`` is a
  2-D model parameter or buffer;
* an **activation site** is the set of linears that read the same tensor (q/k/v; gate/up);
* an **attention core** is a ``scaled_dot_product_attention`` call; its **TAC point** is the input
  of the linear that reads the core's output through view-like ops only (the output projection);
* roles: ``qkv`` (feeds an attention core), ``head`` (reaches the graph output without another
  linear or attention core on the way), ``o`` (reads an attention core), ``gate_up`` (a site whose
  linears meet at a product), ``down`` (reads a product), ``other``.
"""

from __future__ import annotations

import operator
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from stq_compiler.capture import TensorBinding, bind_tensors, embedding_operands, find_token_state_source

LINEAR_TARGETS = {F.linear, torch._C._nn.linear}
MATMUL_TARGETS = {operator.matmul, torch.matmul}
SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
MUL_TARGETS = {operator.mul, torch.mul}

# Ops that only move or re-type data: walking through them keeps "the same tensor".
_VIEW_METHODS = {
    "view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "squeeze",
    "unsqueeze", "to", "float", "half", "bfloat16", "type", "clone", "expand", "t",
}
_VIEW_FUNCTIONS = {
    torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.squeeze, torch.unsqueeze,
    torch.t, operator.getitem,
}


@dataclass(eq=False)
class Linear:
    node: fx.Node
    input: fx.Node
    weight: TensorBinding
    bias: Optional[fx.Node]
    weight_layout: str  # "nk": the stored tensor is [out, in] (nn.Linear); "kn": [in, out]
    role: str = "other"

    @property
    def fqn(self) -> str:
        return self.weight.fqn

    @property
    def out_features(self) -> int:
        return self.weight.tensor.shape[0 if self.weight_layout == "nk" else 1]

    @property
    def in_features(self) -> int:
        return self.weight.tensor.shape[1 if self.weight_layout == "nk" else 0]

    def weight_nk(self) -> torch.Tensor:
        w = self.weight.tensor.detach()
        return w if self.weight_layout == "nk" else w.t()


@dataclass(eq=False)
class Site:
    """Linears that read one activation tensor; they share one activation transform and quantizer."""

    input: fx.Node
    linears: list[Linear]

    @property
    def name(self) -> str:
        """``blocks.0.{q_proj,k_proj,v_proj}``: the linears' module paths, common prefix once."""
        modules = [lin.fqn.rsplit(".", 1)[0] for lin in self.linears]
        if len(modules) == 1:
            return modules[0]
        prefix = os.path.commonprefix(modules).rpartition(".")[0]
        leaves = [m[len(prefix) + 1 :] if prefix else m for m in modules]
        return f"{prefix}.{{{','.join(leaves)}}}" if prefix else "{" + ",".join(leaves) + "}"

    @property
    def role(self) -> str:
        return self.linears[0].role


@dataclass
class AttentionCore:
    sdpa: fx.Node
    output_projection: Optional[Linear]

    @property
    def tac_point(self) -> Optional[fx.Node]:
        """The tensor (heads merged, width C) between the core and its output projection."""
        return self.output_projection.input if self.output_projection else None


@dataclass
class GraphAnalysis:
    bindings: dict[fx.Node, TensorBinding]
    linears: list[Linear]
    sites: list[Site]
    attention: list[AttentionCore]
    state_source: Optional[fx.Node]
    roles: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        roles = ", ".join(f"{k}={v}" for k, v in sorted(self.roles.items()))
        return (
            f"{len(self.linears)} linears ({roles}), {len(self.sites)} sites, "
            f"{len(self.attention)} attention cores, state source: "
            f"{self.state_source.name if self.state_source is not None else 'none'}"
        )


def is_view_like(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    return False


def _transposed_weight(node: fx.Node, bindings) -> Optional[TensorBinding]:
    """``W.t()``, ``W.T``, ``W.transpose(0, 1)``, ``W.permute(1, 0)`` of a 2-D bound tensor."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    base = node.args[0]
    binding = bindings.get(base) if isinstance(base, fx.Node) else None
    if binding is None or binding.tensor.dim() != 2:
        return None
    rest = tuple(node.args[1:])
    if node.op == "call_method" and node.target == "t" or node.op == "call_function" and node.target is torch.t:
        return binding
    if node.target in ("transpose", torch.transpose) and {d % 2 for d in rest} == {0, 1}:
        return binding
    if node.target in ("permute", torch.permute):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if tuple(d % 2 for d in dims) == (1, 0):
            return binding
    if node.op == "call_function" and node.target is getattr and rest == ("T",):
        return binding
    return None


def _match_linear(node: fx.Node, bindings) -> Optional[Linear]:
    if node.op != "call_function":
        return None
    if node.target in LINEAR_TARGETS:
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        binding = bindings.get(w)
        if binding is not None and binding.tensor.dim() == 2 and isinstance(x, fx.Node):
            return Linear(node, x, binding, bias, "nk")
    if node.target in MATMUL_TARGETS and len(node.args) == 2:
        x, w = node.args
        if not isinstance(x, fx.Node) or not isinstance(w, fx.Node) or x in bindings:
            return None
        binding = _transposed_weight(w, bindings)
        if binding is not None:
            return Linear(node, x, binding, None, "nk")
        binding = bindings.get(w)
        if binding is not None and binding.tensor.dim() == 2:
            return Linear(node, x, binding, None, "kn")
    return None


def _reaches(start: fx.Node, is_goal, stop) -> bool:
    """Breadth-first search along users from ``start``, not passing through ``stop`` nodes."""
    seen, queue = {start}, deque(start.users)
    while queue:
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        if is_goal(node):
            return True
        if stop(node):
            continue
        queue.extend(node.users)
    return False


def _through_views_back(node: fx.Node) -> fx.Node:
    while is_view_like(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in MUL_TARGETS) or (
        node.op == "call_method" and node.target == "mul"
    )


_CASTS = {"to", "float", "half", "bfloat16", "type"}


def norm_scale_feeding(site_input: fx.Node, bindings) -> Optional[tuple[fx.Node, TensorBinding]]:
    """``(normalised, norm weight)`` when a site reads ``weight * normalised`` (an RMSNorm/LayerNorm
    scale, possibly followed by a dtype cast); None otherwise."""
    node = site_input
    while node.op == "call_method" and node.target in _CASTS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if not _is_mul(node) or len(node.args) != 2:
        return None
    a, b = node.args
    for weight, normalised in ((a, b), (b, a)):
        binding = bindings.get(weight) if isinstance(weight, fx.Node) else None
        if binding is not None and binding.tensor.dim() == 1 and isinstance(normalised, fx.Node):
            return normalised, binding
    return None


def _derives_from(node, targets: set, depth: int = 4) -> bool:
    """``node`` is one of ``targets`` or computed from one by single-input ops (views, activations)."""
    for _ in range(depth):
        if node in targets:
            return True
        inputs = [a for a in node.all_input_nodes]
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return node in targets


def _is_head(lin: Linear, vocab_rows: Optional[int], barrier) -> bool:
    """The LM head: reaches the output with no linear or attention on the way, and maps to the
    embedding's vocabulary (or, in a graph without the embedding, e.g. after a graph break, feeds
    the output through view-like ops only)."""
    if not _reaches(lin.node, lambda n: n.op == "output", barrier):
        return False
    if vocab_rows is not None:
        return lin.out_features == vocab_rows
    node = lin.node
    while len(node.users) == 1 and is_view_like(next(iter(node.users))):
        node = next(iter(node.users))
    return any(user.op == "output" for user in node.users)


def _assign_roles(linears: list[Linear], sites: list[Site], vocab_rows: Optional[int]) -> None:
    linear_nodes = {l.node for l in linears}
    barrier = lambda n: n in linear_nodes or _is_sdpa(n)  # noqa: E731
    for lin in linears:
        source = _through_views_back(lin.input)
        if _reaches(lin.node, _is_sdpa, barrier):
            lin.role = "qkv"
        elif _is_head(lin, vocab_rows, barrier):
            lin.role = "head"
        elif _is_sdpa(source) or (source.target is operator.getitem and _is_sdpa(source.args[0])):
            lin.role = "o"
        elif _is_mul(source) and all(_derives_from(a, linear_nodes) for a in source.all_input_nodes):
            lin.role = "down"  # reads act(gate) * up
    for site in sites:
        if len(site.linears) < 2 or any(l.role != "other" for l in site.linears):
            continue
        products = []
        for lin in site.linears:  # the products each linear's output reaches (before another linear)
            seen, queue, found = set(), deque(lin.node.users), set()
            while queue:
                n = queue.popleft()
                if n in seen or n in linear_nodes:
                    continue
                seen.add(n)
                if _is_mul(n):
                    found.add(n)
                queue.extend(n.users)
            products.append(found)
        if set.intersection(*products):
            for lin in site.linears:
                lin.role = "gate_up"


def token_embedding(gm: fx.GraphModule, bindings) -> Optional[fx.Node]:
    """The token embedding lookup: the first embedding of a bound model tensor (its rows are the
    vocabulary the LM head maps to); None in a graph without one."""
    for node in gm.graph.nodes:
        operands = embedding_operands(node)
        if operands is not None and isinstance(operands[0], fx.Node) and operands[0] in bindings:
            return node
    return None


def _embedding_rows(gm: fx.GraphModule, bindings) -> Optional[int]:
    node = token_embedding(gm, bindings)
    return bindings[embedding_operands(node)[0]].tensor.shape[0] if node is not None else None


def analyze(gm: fx.GraphModule, example_inputs: list) -> GraphAnalysis:
    """Find linears, sites, attention cores and the token-state source of ``gm``."""
    bindings = bind_tensors(gm, example_inputs)
    linears = [lin for node in gm.graph.nodes if (lin := _match_linear(node, bindings)) is not None]
    by_input: dict[fx.Node, list[Linear]] = {}
    for lin in linears:
        by_input.setdefault(lin.input, []).append(lin)
    sites = [Site(inp, lins) for inp, lins in by_input.items()]
    _assign_roles(linears, sites, _embedding_rows(gm, bindings))

    attention = []
    for node in gm.graph.nodes:
        if _is_sdpa(node):
            proj = next(
                (l for l in linears if l.role == "o" and _through_views_back(l.input) in (node, *node.users)),
                None,
            )
            attention.append(AttentionCore(node, proj))
    roles: dict[str, int] = {}
    for lin in linears:
        roles[lin.role] = roles.get(lin.role, 0) + 1
    return GraphAnalysis(bindings, linears, sites, attention, find_token_state_source(gm, example_inputs), roles)
