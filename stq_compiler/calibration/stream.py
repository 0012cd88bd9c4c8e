"""Block-streamed execution of a captured graph: one transformer block at a time.

Calibration fits block b from what block b sees when every block before it is quantized. Rather
than re-running the whole graph for each block, the captured graph is cut between transformer
blocks (``partition``) and only block b's piece runs, on the tensors that cross into it, which a
``BoundaryStream`` keeps for every calibration batch (on the host).

* **Cuts.** Between block b-1's last linear and block b's first activation (its sites' inputs, or
  the normalised tensor a norm scale multiplies), the graph is cut where the fewest bytes cross:
  after the residual add, so the residual stream crosses, plus what every block reads (rotary
  tables, attention masks). Piece 0 also holds the prologue (embedding), the last piece the
  epilogue (final norm, LM head). Found from graph patterns only, never module names.
* **Pieces of rewrites.** The captured graph's nodes carry their piece in ``meta["stq_piece"]``;
  a node a pass inserts (transforms, quantizers, observers) joins the piece of the captured node
  before it in graph order. So piece b can be cut out of any rewrite of the captured graph (float
  with observers, or with block b quantized) and reads the same boundary tensors.
* **Inputs that are not boundary tensors.** Placeholders (parameters, ``input_ids``) and
  ``get_attr`` constants are read by each piece directly: a piece's parameters move to the device
  only while the piece is processed. The token state (``is_masked``) is recomputed per piece.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from itertools import pairwise
from typing import Optional

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

PIECE_META_KEY = "stq_piece"
_GLOBAL_OPS = ("placeholder", "get_attr", "output")


class StreamError(ValueError):
    pass


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _best_cut(nodes: list[fx.Node], lo: int, hi: int) -> int:
    """The position in ``[lo, hi]`` before which cutting lets the fewest bytes cross (earliest on ties)."""
    order = {n: i for i, n in enumerate(nodes)}
    last_use = {
        n: max((order[u] for u in n.users if u.op != "output"), default=-1)
        for n in nodes[:hi] if n.op not in _GLOBAL_OPS
    }

    def crossing(cut: int) -> int:
        return sum(_nbytes(n.meta.get("example_value")) for n in nodes[:cut] if n in last_use and last_use[n] >= cut)

    return min(range(lo, hi + 1), key=lambda cut: (crossing(cut), cut))


def annotate_pieces(gm: fx.GraphModule, blocks: list[list[tuple[list[fx.Node], list[fx.Node]]]]) -> int:
    """Cut the captured graph into one piece per block; mark every node with its piece.

    ``blocks``: per block, per site, (the site's linear nodes, the nodes observers may read: the
    site input and the normalised tensor a folded norm scale multiplies). Returns the piece count."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    cuts = []
    for prev, block in pairwise(blocks):
        after = max(order[lin] for linears, _ in prev for lin in linears) + 1
        first = min(order[n] for _, observed in block for n in observed)
        if first < after:
            raise StreamError(
                f"calibrate: cannot stream block by block: block {len(cuts) + 1} reads "
                f"{nodes[first].name} before block {len(cuts)}'s last linear runs"
            )
        cuts.append(_best_cut(nodes, after, first))
    piece = 0
    for i, node in enumerate(nodes):
        piece += piece < len(cuts) and i == cuts[piece]
        node.meta[PIECE_META_KEY] = piece
    return len(cuts) + 1


def pieces_of(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Each computing node's piece; nodes a pass added join the captured node before them."""
    out, piece = {}, 0
    for node in gm.graph.nodes:
        piece = node.meta.get(PIECE_META_KEY, piece)
        if node.op not in _GLOBAL_OPS:
            out[node] = piece
    return out


@dataclass
class Piece:
    """One block's nodes as a module: ``module(*boundary tensors, *placeholder values)``."""

    index: int
    module: fx.GraphModule
    boundary: list[str]  # earlier pieces' tensors it reads (node names of the captured graph)
    inputs: list[int]  # positions of the captured graph's placeholders it reads
    outputs: list[str]  # its tensors that later pieces read


def extract_piece(gm: fx.GraphModule, index: int, outputs: list[str], state: Optional[fx.Node] = None) -> Piece:
    """Piece ``index`` of ``gm`` (the captured graph or a rewrite of it) as its own module returning
    the nodes named ``outputs``. Dead nodes are dropped; observer calls (``call_module``) are kept."""
    piece_of = pieces_of(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    members = [n for n, p in piece_of.items() if p == index and n is not state]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    boundary: dict[fx.Node, fx.Node] = {}
    reads: dict[fx.Node, fx.Node] = {}

    def lookup(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if node.op == "placeholder":
            value = reads.setdefault(node, graph.placeholder(node.name))
        elif node.op == "get_attr":
            value = graph.get_attr(node.target)
        elif node is state:  # a cheap function of input_ids: recomputed rather than carried
            value = graph.node_copy(node, lookup)
        elif piece_of.get(node, index) < index:
            value = boundary.setdefault(node, graph.placeholder(node.name))
        else:
            raise StreamError(f"calibrate: piece {index} reads {node.name}, which a later piece computes")
        env[node] = value
        return value

    for node in members:
        env[node] = graph.node_copy(node, lookup)
    by_name = {n.name: n for n in members}
    missing = [name for name in outputs if name not in by_name]
    if missing:
        raise StreamError(f"calibrate: piece {index} no longer computes {missing}, which later pieces read; "
                          "a rewrite replaced a tensor that crosses a block boundary")
    graph.output(tuple(env[by_name[name]] for name in outputs))
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op == "call_module" or n.is_impure())
    for node in [*boundary.values(), *reads.values()]:  # drop inputs nothing reads any more
        if not node.users:
            graph.erase_node(node)
    # placeholders in a fixed order: boundary tensors, then the captured graph's inputs
    live = {n for n in graph.nodes if n.op == "placeholder"}
    kept_boundary = [(src, ph) for src, ph in boundary.items() if ph in live]
    kept_reads = sorted(((placeholders.index(src), ph) for src, ph in reads.items() if ph in live), key=lambda t: t[0])
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for _, ph in [*kept_boundary, *kept_reads]:
        first.prepend(ph)
    graph.lint()
    return Piece(index, fx.GraphModule(gm, graph), [src.name for src, _ in kept_boundary], [i for i, _ in kept_reads], list(outputs))


def boundary_outputs(gm: fx.GraphModule, count: int) -> tuple[list[list[str]], dict[str, int]]:
    """Per piece, the names of its tensors that later pieces read; and each name's last reader."""
    piece_of = pieces_of(gm)
    outputs: list[list[str]] = [[] for _ in range(count)]
    last: dict[str, int] = {}
    for node, piece in piece_of.items():
        readers = [piece_of[u] for u in node.users if u in piece_of and piece_of[u] > piece]
        if readers:
            outputs[piece].append(node.name)
            last[node.name] = max(readers)
    return outputs, last


class BoundaryStream:
    """The tensors crossing into the next piece, for every calibration batch.

    Kept on the host (pinned when the device is a GPU, so copies are fast); a piece's inputs move
    to ``device`` one batch at a time."""

    def __init__(self, batches: list[torch.Tensor], ids_index: int, device: torch.device, last_reader: dict[str, int]):
        self.batches, self.ids_index, self.device = batches, ids_index, torch.device(device)
        self.last_reader = last_reader
        self.values: dict[str, list] = {}

    def _host(self, value):
        if not isinstance(value, torch.Tensor):
            return value
        if self.device.type != "cuda":
            return value.detach()
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        return host.copy_(value.detach())

    def _device(self, value):
        return value.to(self.device, non_blocking=True) if isinstance(value, torch.Tensor) else value

    def run(self, piece: Piece, inputs: list, advance: bool, on_batch: Optional[Callable[[], None]] = None) -> None:
        """Run ``piece`` on every batch; ``inputs`` are the captured graph's placeholder values
        (``input_ids`` is replaced by the batch). With ``advance``, the piece's outputs replace
        the boundary tensors that no later piece reads."""
        produced: dict[str, list] = {name: [] for name in piece.outputs}
        missing = [name for name in piece.boundary if name not in self.values]
        if missing:
            raise StreamError(f"calibrate: piece {piece.index} reads {missing}, which no earlier piece handed on")
        with torch.no_grad():
            for i, batch in enumerate(self.batches):
                args = [tree_map(self._device, self.values[name][i]) for name in piece.boundary]
                args += [batch.to(self.device) if j == self.ids_index else inputs[j] for j in piece.inputs]
                out = piece.module(*args)
                if advance:
                    for name, value in zip(piece.outputs, out):
                        produced[name].append(tree_map(self._host, value))
                if on_batch is not None:
                    on_batch()
        if advance:
            self.values = {k: v for k, v in self.values.items() if self.last_reader[k] > piece.index}
            self.values.update(produced)
