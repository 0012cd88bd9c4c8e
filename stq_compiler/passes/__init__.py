"""Graph passes. Each is a function of a GraphModule (plus what it needs) that rewrites the graph
in place, returns it, and reports what it changed in a ``PassReport``."""

from __future__ import annotations

from dataclasses import dataclass, field

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


def register_constant(gm: fx.GraphModule, name: str, tensor) -> None:
    """Attach a tensor computed at compile time (quantized weights) to ``gm`` as a buffer.

    AOTAutograd lifts buffers to graph inputs and, for a Dynamo graph, asks for each one's source;
    a ``ConstantSource`` says it is ours, and marks it static (it never changes between calls).
    """
    from torch._dynamo.source import ConstantSource

    gm.register_buffer(name, tensor)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        sources[name] = ConstantSource(name)
