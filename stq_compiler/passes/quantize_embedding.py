"""quantize_embedding: the token embedding lookup reads int8 rows instead of the float table.

Expects: an analysed graph whose token embedding (``analysis.token_embedding``: the first
``F.embedding`` / ``torch.embedding`` / ``aten.embedding`` of a bound model tensor) reads a
floating-point table [V, D].

Leaves: every lookup of that table replaced by ``ops.embedding_int8(codes, scale, ids, dtype)`` on
two buffers of the graph module, ``codes`` int8 [V, D] and ``scale`` float32 [V] (rows quantized
once, here; ``ops.quantize_embedding_rows``), in the lookup's output dtype. The lookup is plain
torch (a gather and a multiply) that Inductor fuses into the kernel reading the embedding.

The float table stays a graph input. Nothing reads it any more unless something else does: an LM
head tied to the embedding keeps reading it when the head is not quantized (``quantize_head=True``
gives the head its own quantized copy first). The report says which (``float_weight_readers``,
``float_weight_unread``): only an unread table can be given back.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from stq_compiler.analysis import GraphAnalysis, token_embedding
from stq_compiler.capture import embedding_operands
from stq_compiler.ops import embedding_int8, quantize_embedding_rows
from stq_compiler.passes import PassReport, count_nodes, register_constant
from stq_compiler.passes.quantize_linears import buffer_name

log = logging.getLogger(__name__)


def _max_norm(node: fx.Node):
    """F.embedding's ``max_norm``: set, the lookup renormalises the rows it reads in place."""
    if node.target is not torch.nn.functional.embedding:
        return None
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")


def quantize_embedding(gm: fx.GraphModule, analysis: GraphAnalysis) -> tuple[fx.GraphModule, PassReport]:
    report = PassReport("quantize_embedding", nodes_before=count_nodes(gm))
    details = {"fqn": None, "rows": 0, "dim": 0, "lookups": 0, "bytes_before": 0, "bytes_after": 0,
               "float_weight_readers": [], "float_weight_unread": None}
    report.details = details
    found = token_embedding(gm, analysis.bindings)
    weight_node = embedding_operands(found)[0] if found is not None else None
    binding = analysis.bindings.get(weight_node)
    if binding is None or binding.tensor.dim() != 2 or not binding.tensor.is_floating_point():
        details["skipped"] = "no token embedding of a floating-point table in this graph"
        report.nodes_after = count_nodes(gm)
        return gm, report
    lookups = [n for n in gm.graph.nodes if (ops := embedding_operands(n)) is not None and ops[0] is weight_node]
    if any(_max_norm(n) is not None for n in lookups):
        details["skipped"] = "the lookup renormalises rows (max_norm): the table changes as it is read"
        report.nodes_after = count_nodes(gm)
        return gm, report

    weight = binding.tensor.detach()
    codes, scale = quantize_embedding_rows(weight)
    names = buffer_name(binding.fqn, "emb8_codes"), buffer_name(binding.fqn, "emb8_scale")
    for name, tensor in zip(names, (codes, scale)):
        register_constant(gm, name, tensor)
    graph = gm.graph
    for node in lookups:
        value = node.meta.get("example_value")
        out_dtype = value.dtype if isinstance(value, torch.Tensor) else weight.dtype
        with graph.inserting_before(node):
            codes_node, scale_node = graph.get_attr(names[0]), graph.get_attr(names[1])
            new = graph.call_function(embedding_int8, (codes_node, scale_node, embedding_operands(node)[1], out_dtype))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "val", "stack_trace")})
        new.meta["stq_embedding"] = {"fqn": binding.fqn, "bits": 8}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    if weight_node.op == "get_attr" and not weight_node.users:
        graph.erase_node(weight_node)  # a placeholder stays (a graph input); an attribute read goes
    graph.lint()
    gm.recompile()

    readers = [user.name for user in weight_node.users]
    rows, dim = weight.shape
    details.update(
        fqn=binding.fqn,
        rows=rows,
        dim=dim,
        lookups=len(lookups),
        bytes_before=weight.numel() * weight.element_size(),
        bytes_after=codes.numel() * codes.element_size() + scale.numel() * scale.element_size(),
        float_weight_readers=readers,
        float_weight_unread=not readers,
    )
    if readers:
        log.warning(
            "starquant: quantize_embedding: %s is still read by %s (an LM head tied to the embedding?): the float "
            "table stays needed and the int8 copy adds %d bytes; quantize_head=True quantizes the head too",
            binding.fqn, ", ".join(readers), details["bytes_after"],
        )
    report.nodes_after = count_nodes(gm)
    return gm, report
