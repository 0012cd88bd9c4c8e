"""insert_tac: Temporal Attention Compensation between each attention core and its output projection.

Expects: an analysed graph (``stq_compiler.analysis``) in which each attention core's output
projection reads the TAC point ``z`` (heads merged, width C), and fitted ``TacParams`` keyed by the
projection's weight FQN (``core.output_projection.fqn``).
Leaves: for each such projection ``M`` and ``d`` as buffers of the graph module, and
``tac = stq.tac_block_affine(z, get_attr M, get_attr d)`` right before the projection, which now
reads ``tac``; any other reader of ``z`` still reads ``z``. The analysis is updated in place: the
projection's ``Linear.input`` and its ``Site.input`` are the TAC node, so a later
``quantize_linears`` quantizes the compensated activation.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import stq_compiler.tac_ops  # noqa: F401  (registers stq::tac_block_affine)
from stq_compiler.analysis import GraphAnalysis, Linear, Site
from stq_compiler.calibration.tac import TacParams
from stq_compiler.passes import PassReport, count_nodes, register_constant
from stq_compiler.passes.quantize_linears import buffer_name

TAC_OP = torch.ops.stq.tac_block_affine.default


class TacError(ValueError):
    pass


def _retarget_site(analysis: GraphAnalysis, proj: Linear, tac: fx.Node) -> None:
    """Make the projection's site read ``tac``; split it off if other linears shared its input."""
    for i, site in enumerate(analysis.sites):
        if not any(lin is proj for lin in site.linears):
            continue
        if len(site.linears) == 1:
            site.input = tac
        else:
            site.linears = [lin for lin in site.linears if lin is not proj]
            analysis.sites.insert(i + 1, Site(tac, [proj]))
        return


def insert_tac(
    gm: fx.GraphModule, analysis: GraphAnalysis, params: dict[str, TacParams]
) -> tuple[fx.GraphModule, PassReport]:
    report = PassReport("insert_tac", nodes_before=count_nodes(gm))
    graph = gm.graph
    projections = {c.output_projection.fqn: c.output_projection for c in analysis.attention if c.output_projection}
    missing = sorted(set(params) - set(projections))
    if missing:
        raise TacError(
            f"starquant: TAC parameters given for {missing}, which this graph has no attention output "
            f"projection for; its output projections are {sorted(projections)}"
        )
    chosen = [(fqn, proj) for fqn, proj in projections.items() if fqn in params]
    for fqn, proj in chosen:  # check them all before changing anything
        if proj.input.op == "call_function" and proj.input.target is TAC_OP:
            raise TacError(f"starquant: {fqn} already reads a TAC node ({proj.input.name}); insert_tac ran twice")
        if params[fqn].channels != proj.in_features:
            raise TacError(
                f"starquant: TAC parameters for {fqn} have {params[fqn].channels} channels but the "
                f"projection reads {proj.in_features}"
            )
    inserted, nbytes = [], 0
    for fqn, proj in chosen:
        p = params[fqn]
        point = proj.input
        device = proj.weight.tensor.device
        m_name, d_name = buffer_name(fqn, "tac_M"), buffer_name(fqn, "tac_d")
        m, d = p.M.to(device=device, dtype=torch.float32), p.d.to(device=device, dtype=torch.float32)
        register_constant(gm, m_name, m)
        register_constant(gm, d_name, d)
        with graph.inserting_before(proj.node):
            m_node, d_node = graph.get_attr(m_name), graph.get_attr(d_name)
            tac = graph.call_function(TAC_OP, (point, m_node, d_node))
        if "example_value" in point.meta:  # same shape and dtype as the point
            tac.meta["example_value"] = point.meta["example_value"]
        tac.meta["stq_tac"] = {"fqn": fqn, "group": p.group}
        proj.node.replace_input_with(point, tac)
        proj.input = tac
        _retarget_site(analysis, proj, tac)
        inserted.append(fqn)
        nbytes += (m.numel() + d.numel()) * 4
    graph.lint()
    gm.recompile()
    report.nodes_after = count_nodes(gm)
    report.details = {
        "tac_nodes": len(inserted),
        "projections": inserted,
        "groups": sorted({params[f].group for f in inserted}),
        "parameter_bytes": nbytes,
    }
    return gm, report
