"""quantize_linears: each eligible site's transform, activation quantizer and quantized linears.

Expects: an analysed graph (``stq_compiler.analysis``); optionally the token-state node, a
``SiteTransform`` per site (keyed by ``site_key``) and precomputed quantized weights (GPTQ) per
linear FQN. Without transforms this is round-to-nearest W{4,8}A{4,8}.

Leaves, per site: the activation transform (norm-scale fold, smoothing, ``stq.kron_transform``),
one ``stq.quantize_per_token`` node (consuming the token state, and the site's state gates when
it has them) shared by the site's linears, and per linear one ``stq.quantized_linear`` whose
folded weight was quantized here, once, into buffers of the graph module. The float weight
placeholders stay graph inputs that nothing reads.

With ``quantize=False`` the transforms are inserted but the linears stay float
(``linear(x'', W'')``): the reference in which every transform must be exact, and the "quantizers
off" run of calibration.
"""

from __future__ import annotations

import operator
import re
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from stq_compiler.analysis import GraphAnalysis, Linear, Site, norm_scale_feeding
from stq_compiler.ops import QuantizedWeight, quantize_weight
from stq_compiler.passes import PassReport, count_nodes, register_constant
from stq_compiler.site_transform import SiteTransform

# Roles left in 16 bits unless asked for (the paper keeps the LM head in 16 bits).
HEAD_ROLES = ("head",)


def buffer_name(fqn: str, what: str) -> str:
    return "stq_" + re.sub(r"\W", "_", fqn) + "_" + what


def site_key(site: Site) -> str:
    """A site's name in recipes: the smallest weight FQN among its linears (order-independent)."""
    return min(lin.fqn for lin in site.linears)


def _dtype_of(node: fx.Node, default: torch.dtype) -> torch.dtype:
    value = node.meta.get("example_value")
    return value.dtype if isinstance(value, torch.Tensor) else default


def eligible(linear: Linear, quantize_head: bool) -> bool:
    return quantize_head or linear.role not in HEAD_ROLES


class _Constants:
    """Registers compile-time tensors as buffers of ``gm`` and hands out get_attr nodes."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.bytes = gm, 0

    def __call__(self, name: str, tensor: torch.Tensor) -> fx.Node:
        if not hasattr(self.gm, name):
            register_constant(self.gm, name, tensor)
            self.bytes += tensor.numel() * tensor.element_size()
        return self.gm.graph.get_attr(name)


def _transformed_activation(graph, const, site, key, transform, bindings, state, quantize):
    """Insert the site's activation-side transform; returns (activation node, norm weight or None)."""
    act, norm_weight = site.input, None
    if transform is None:
        return act, None
    where = f"site {site.name}"
    transform.check(site.linears[0].in_features, where)
    device = site.linears[0].weight.tensor.device
    if transform.fold_norm:
        feed = norm_scale_feeding(site.input, bindings)
        if feed is None:
            raise ValueError(f"{where}: the recipe folds a norm scale, but no norm weight multiplies this site's input")
        act, norm_binding = feed
        norm_weight = norm_binding.tensor
    if transform.smooth is not None:
        inv = const(buffer_name(key, "inv_smooth"), (1.0 / transform.smooth.double()).float().to(device))
        act = graph.call_function(operator.mul, (act, inv))
    if transform.has_rotation:
        p1 = const(buffer_name(key, "p1"), transform.p1.float().to(device))
        p2 = const(buffer_name(key, "p2"), transform.p2.float().to(device))
        act = graph.call_function(torch.ops.stq.kron_transform.default, (act, p1, p2))
    if transform.has_gates:
        if state is None:
            raise ValueError(f"{where}: the recipe gates activations by token state, but the graph has no token state")
        if not quantize:  # the quantizer applies the gates itself; the float reference does it here
            gm_, gu_ = (const(buffer_name(key, n), t.float().to(device)) for n, t in (("gate_m", transform.gate_masked), ("gate_u", transform.gate_unmasked)))
            gate = graph.call_function(torch.where, (graph.call_method("unsqueeze", (state, -1)), gm_, gu_))
            act = graph.call_function(operator.mul, (act, gate))
    if not quantize:
        act = graph.call_method("to", (act, _dtype_of(site.input, torch.float32)))
    return act, norm_weight


def quantize_linears(
    gm: fx.GraphModule,
    analysis: GraphAnalysis,
    w_bits: int,
    a_bits: int,
    state: Optional[fx.Node] = None,
    quantize_head: bool = False,
    transforms: Optional[dict[str, SiteTransform]] = None,
    weights: Optional[dict[str, QuantizedWeight]] = None,
    quantize: bool = True,
) -> tuple[fx.GraphModule, PassReport]:
    report = PassReport("quantize_linears", nodes_before=count_nodes(gm))
    graph = gm.graph
    const = _Constants(gm)
    transforms, weights = transforms or {}, weights or {}
    quantized, skipped, sites, transformed = [], [], 0, 0
    order = {node: i for i, node in enumerate(graph.nodes)}
    for site in analysis.sites:
        linears = [lin for lin in site.linears if eligible(lin, quantize_head)]
        skipped += [lin.fqn for lin in site.linears if lin not in linears]
        if not linears:
            continue
        if len(linears) != len(site.linears) and site_key(site) in transforms:
            raise ValueError(f"site {site.name}: a transformed site must be quantized whole")
        sites += 1
        key = site_key(site)
        transform = transforms.get(key)
        transformed += transform is not None
        device = linears[0].weight.tensor.device
        first = min(linears, key=lambda lin: order[lin.node])
        with graph.inserting_before(first.node):
            act, norm_weight = _transformed_activation(graph, const, site, key, transform, analysis.bindings, state, quantize)
            if quantize:
                kwargs = {"is_masked": state} if state is not None else {}
                if transform is not None and transform.has_gates:
                    kwargs["gate_masked"] = const(buffer_name(key, "gate_m"), transform.gate_masked.float().to(device))
                    kwargs["gate_unmasked"] = const(buffer_name(key, "gate_u"), transform.gate_unmasked.float().to(device))
                q = graph.call_function(torch.ops.stq.quantize_per_token.default, (act, a_bits), kwargs)
                codes, scale, zero = (graph.call_function(operator.getitem, (q, i)) for i in range(3))
        for lin in linears:
            folded = transform.fold_weight(lin.weight_nk(), norm_weight) if transform is not None else lin.weight_nk()
            with graph.inserting_before(lin.node):
                if quantize:
                    qw = weights.get(lin.fqn) or quantize_weight(folded, w_bits)
                    if qw.q.shape != folded.shape or qw.bits != w_bits:
                        raise ValueError(
                            f"{lin.fqn}: precomputed {qw.bits}-bit weight of shape {tuple(qw.q.shape)} does not fit "
                            f"a {w_bits}-bit linear of shape {tuple(folded.shape)}"
                        )
                    prefix = buffer_name(lin.fqn, f"w{w_bits}")
                    wq, ws, wsum = (const(prefix + s, t.to(device)) for s, t in (("_q", qw.q), ("_scale", qw.scale), ("_sum", qw.w_sum)))
                    new = graph.call_function(
                        torch.ops.stq.quantized_linear.default,
                        (codes, scale, zero, wq, ws, wsum, lin.bias, _dtype_of(lin.node, lin.weight.tensor.dtype)),
                    )
                else:
                    w = const(buffer_name(lin.fqn, "folded"), folded.to(device, lin.weight.tensor.dtype))
                    new = graph.call_function(F.linear, (act, w, lin.bias))
            new.meta["stq_linear"] = {"fqn": lin.fqn, "role": lin.role, "w_bits": w_bits if quantize else 16, "a_bits": a_bits if quantize else 16}
            lin.node.replace_all_uses_with(new)
            graph.erase_node(lin.node)
            quantized.append(lin.fqn)
    # the token state stays even when nothing here reads it: later passes may (and meta names it)
    graph.eliminate_dead_code(is_impure_node=lambda n: n is state or n.is_impure())
    graph.lint()
    gm.recompile()
    report.nodes_after = count_nodes(gm)
    report.details = {
        "linears_quantized": len(quantized) if quantize else 0,
        "linears_transformed": sum(len(s.linears) for s in analysis.sites if site_key(s) in transforms),
        "sites": sites,
        "sites_transformed": transformed,
        "skipped": skipped,
        "w_bits": w_bits,
        "a_bits": a_bits,
        "constant_bytes": const.bytes,  # codes stored one per int8 (packing comes with the fused kernels)
        "state_consumers": sites if state is not None and quantize else 0,
    }
    return gm, report
