"""Graph passes. Each is a function of a GraphModule (plus what it needs) that rewrites the graph
in place, returns it, and reports what it changed in a ``PassReport``."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx


@dataclass
class PassReport:
    name: str
    nodes_before: int = 0
    nodes_after: int = 0
    details: dict = field(default_factory=dict)

    @property
    def nodes_delta(self) -> int:
        return self.nodes_after - self.nodes_before


def count_nodes(gm: fx.GraphModule) -> int:
    return len(gm.graph.nodes)


# Constants registered so far, by (name, shape, dtype, device): weak references, so an entry lives
# only as long as some compiled graph holds its tensor.
_registered: dict[tuple, list[weakref.ref]] = {}


def shared_constant(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or an equal one a live graph already holds under the same name.

    Every compile of a model (each input shape with ``dynamic=False``, Dynamo's automatic dynamic
    recompile, a recompile after a guard fails) folds and quantizes the weights again; without
    this each graph would keep its own copy of the quantized model (5 GB more per shape at
    LLaDA-8B W4A4). Names carry the weight's FQN and what the tensor is; equality is checked, so
    other weights or another recipe under the same names are never shared."""
    key = (name, tuple(tensor.shape), tensor.dtype, tensor.device)
    live = [r for r in _registered.get(key, []) if r() is not None]
    for ref in live:
        held = ref()
        if held is not None and torch.equal(held, tensor):
            return held
    _registered[key] = [*live, weakref.ref(tensor)]  # (a dead graph's keys stay, with dead references)
    return tensor


def register_constant(gm: fx.GraphModule, name: str, tensor) -> None:
    """Attach a tensor computed at compile time (quantized weights) to ``gm`` as a buffer; an
    equal tensor another live graph holds under that name is shared instead (``shared_constant``).

    AOTAutograd lifts buffers to graph inputs and, for a Dynamo graph, asks for each one's source;
    a ``ConstantSource`` says it is ours, and marks it static (it never changes between calls).
    """
    from torch._dynamo.source import ConstantSource

    gm.register_buffer(name, shared_constant(name, tensor))
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        sources[name] = ConstantSource(name)
