"""Capture: bind the placeholders of a Dynamo graph to parameter names and tensors.

Dynamo hands a backend a ``GraphModule`` whose parameters arrive as placeholders (nn-module
inlining) together with the real tensors (``example_inputs``). Each placeholder's ``grapharg``
source says where the value came from, e.g.
``L['self']._modules['transformer']._modules['blocks']._modules['0']._modules['q_proj']._parameters['weight']``;
we turn that into the fully qualified name ``transformer.blocks.0.q_proj.weight``. Tensors held as
attributes of the graph module itself (``get_attr``) are bound by their attribute path.

The token-state source is the integer input that an embedding lookup reads: ``input_ids``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

# One accessor of a Dynamo source name: ._modules['x'], ._parameters['x'], ._buffers['x'], .x, [0], ['x']
_ACCESSOR = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]|\['([^']+)'\]")
_ROOT = re.compile(r"^L\['[^']+'\]")

# F.embedding(ids, weight, ...); torch.embedding and aten.embedding take (weight, ids, ...)
EMBEDDING_TARGETS = {F.embedding, torch.embedding, torch.ops.aten.embedding.default}


def embedding_operands(node: fx.Node) -> Optional[tuple[object, object]]:
    """``(weight, ids)`` of an embedding lookup node; None for any other node."""
    if node.op != "call_function" or node.target not in EMBEDDING_TARGETS:
        return None
    if node.target is F.embedding:
        ids = node.args[0] if node.args else node.kwargs.get("input")
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        return weight, ids
    return node.args[0], node.args[1]


@dataclass(frozen=True)
class TensorBinding:
    """A graph input or attribute that holds a parameter or buffer of the model."""

    node: fx.Node
    fqn: str
    tensor: torch.Tensor
    is_parameter: bool


def _source_name(node: fx.Node) -> Optional[str]:
    grapharg = node.meta.get("grapharg")
    if grapharg is None or getattr(grapharg, "source", None) is None:
        return node.meta.get(SOURCE_META_KEY)
    name = grapharg.source.name
    return name() if callable(name) else name


SOURCE_META_KEY = "stq_source"


def keep_sources(gm: fx.GraphModule) -> fx.GraphModule:
    """Copy each placeholder's Dynamo source name into its own meta key.

    Dynamo drops the ``grapharg`` metadata once the backend returns; a graph kept for later
    analysis (tests, inspection) needs this called inside the backend call.
    """
    for node in gm.graph.nodes:
        if node.op == "placeholder" and SOURCE_META_KEY not in node.meta:
            name = _source_name(node)
            if name is not None:
                node.meta[SOURCE_META_KEY] = name
    return gm


def fqn_from_source(source: str) -> Optional[str]:
    """``L['self']._modules['a']._parameters['w']`` -> ``a.w``; None when it is no module attribute."""
    if "._parameters[" not in source and "._buffers[" not in source:
        return None
    rest = _ROOT.sub("", source)
    # Skip the argument indexing of the root (L['args'][0]) up to the first module access.
    first = min((i for i in (rest.find("._modules["), rest.find("._parameters["), rest.find("._buffers[")) if i >= 0))
    parts = []
    for match in _ACCESSOR.finditer(rest[first:]):
        parts.append(next(g for g in match.groups() if g is not None))
    return ".".join(parts) if parts else None


def bind_tensors(gm: fx.GraphModule, example_inputs: list) -> dict[fx.Node, TensorBinding]:
    """Map each placeholder / get_attr node holding a model parameter or buffer to its FQN and tensor."""
    bindings: dict[fx.Node, TensorBinding] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        source = _source_name(node)
        fqn = fqn_from_source(source) if source else None
        if fqn is not None and isinstance(value, torch.Tensor):
            bindings[node] = TensorBinding(node, fqn, value, isinstance(value, torch.nn.Parameter) or "._parameters[" in source)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = get_attr_value(gm, node.target)
            if isinstance(value, torch.Tensor):
                bindings[node] = TensorBinding(node, node.target, value, isinstance(value, torch.nn.Parameter))
    return bindings


def get_attr_value(gm: fx.GraphModule, target: str):
    """The object a ``get_attr`` target names on ``gm`` (None when it is missing)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def example_inputs_by_node(gm: fx.GraphModule, example_inputs: list) -> dict[fx.Node, object]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(placeholders, example_inputs))


def find_token_state_source(gm: fx.GraphModule, example_inputs: list) -> Optional[fx.Node]:
    """The integer graph input read by an embedding lookup of a model parameter (``input_ids``)."""
    values = example_inputs_by_node(gm, example_inputs)
    for node in gm.graph.nodes:
        operands = embedding_operands(node)
        if operands is not None:
            ids = operands[1]
            value = values.get(ids) if isinstance(ids, fx.Node) else None
            if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool:
                return ids
    return None
