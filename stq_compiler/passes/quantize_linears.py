"""quantize_linears: round-to-nearest W{4,8}A{4,8} for every eligible linear.

Expects: an analysed graph (``stq_compiler.analysis``); optionally the token-state node.
Leaves: per activation site one ``stq.quantize_per_token`` node (shared by the site's linears,
consuming the token state when there is one), and per linear one ``stq.quantized_linear`` node
whose weight codes, scales and sums are buffers of the graph module, quantized here once. The
float weight placeholders stay graph inputs but nothing reads them any more.
"""

from __future__ import annotations

import operator
import re
from typing import Optional

import torch
import torch.fx as fx

from stq_compiler.analysis import GraphAnalysis, Linear
from stq_compiler.ops import quantize_weight
from stq_compiler.passes import PassReport, count_nodes, register_constant

# Roles left in 16 bits unless asked for (the paper keeps the LM head in 16 bits).
HEAD_ROLES = ("head",)


def buffer_name(fqn: str, what: str) -> str:
    return "stq_" + re.sub(r"\W", "_", fqn) + "_" + what


def _out_dtype(linear: Linear) -> torch.dtype:
    value = linear.node.meta.get("example_value")
    if isinstance(value, torch.Tensor):
        return value.dtype
    return linear.weight.tensor.dtype


def eligible(linear: Linear, quantize_head: bool) -> bool:
    return quantize_head or linear.role not in HEAD_ROLES


def quantize_linears(
    gm: fx.GraphModule,
    analysis: GraphAnalysis,
    w_bits: int,
    a_bits: int,
    state: Optional[fx.Node] = None,
    quantize_head: bool = False,
) -> tuple[fx.GraphModule, PassReport]:
    report = PassReport("quantize_linears", nodes_before=count_nodes(gm))
    graph = gm.graph
    quantized, skipped, weight_bytes = [], [], 0
    registered: dict[str, str] = {}  # a weight shared by several linears is quantized once
    sites = 0
    order = {node: i for i, node in enumerate(graph.nodes)}
    for site in analysis.sites:
        linears = [lin for lin in site.linears if eligible(lin, quantize_head)]
        skipped += [lin.fqn for lin in site.linears if lin not in linears]
        if not linears:
            continue
        sites += 1
        first = min(linears, key=lambda lin: order[lin.node])
        with graph.inserting_before(first.node):
            q = graph.call_function(torch.ops.stq.quantize_per_token.default, (site.input, a_bits), {"is_masked": state} if state is not None else {})
            codes, scale, zero = (graph.call_function(operator.getitem, (q, i)) for i in range(3))
        for lin in linears:
            prefix = buffer_name(lin.fqn, f"w{w_bits}")
            if prefix not in registered:
                qw = quantize_weight(lin.weight_nk(), w_bits)
                device = lin.weight.tensor.device
                register_constant(gm, prefix + "_q", qw.q.to(device))
                register_constant(gm, prefix + "_scale", qw.scale.to(device))
                register_constant(gm, prefix + "_sum", qw.w_sum.to(device))
                registered[prefix] = lin.fqn
                weight_bytes += sum(t.numel() * t.element_size() for t in (qw.q, qw.scale, qw.w_sum))
            with graph.inserting_before(lin.node):
                wq, ws, wsum = (graph.get_attr(prefix + suffix) for suffix in ("_q", "_scale", "_sum"))
                new = graph.call_function(
                    torch.ops.stq.quantized_linear.default,
                    (codes, scale, zero, wq, ws, wsum, lin.bias, _out_dtype(lin)),
                )
            new.meta["stq_linear"] = {"fqn": lin.fqn, "role": lin.role, "w_bits": w_bits, "a_bits": a_bits}
            lin.node.replace_all_uses_with(new)
            graph.erase_node(lin.node)
            quantized.append(lin.fqn)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    report.nodes_after = count_nodes(gm)
    report.details = {
        "linears_quantized": len(quantized),
        "sites": sites,
        "skipped": skipped,
        "w_bits": w_bits,
        "a_bits": a_bits,
        "weight_buffer_bytes": weight_bytes,  # codes stored one per int8 (packing comes with the fused kernels)
        "state_consumers": sites if state is not None else 0,
    }
    return gm, report
