"""insert_token_state: one ``is_masked = input_ids == mask_token_id`` node for the whole graph.

Expects: a graph whose token-state source (the ``input_ids`` placeholder) analysis found.
Leaves: the same graph with one ``torch.eq`` node right after that placeholder, recorded in
``gm.meta["stq_token_state"]``; every state-conditioned node the later passes insert consumes it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from stq_compiler.passes import PassReport, count_nodes

STATE_META_KEY = "stq_token_state"


class TokenStateError(ValueError):
    pass


def insert_token_state(gm: fx.GraphModule, state_source: fx.Node, mask_token_id: int) -> tuple[fx.GraphModule, PassReport]:
    report = PassReport("insert_token_state", nodes_before=count_nodes(gm))
    if state_source is None:
        raise TokenStateError(
            "starquant: this graph has no token-state source (an integer input_ids read by an "
            "embedding), but the token state is needed; call the model with input_ids, or set "
            "options['token_state']='off' if the recipe does not depend on the token state"
        )
    with gm.graph.inserting_after(state_source):
        state = gm.graph.create_node("call_function", torch.eq, (state_source, mask_token_id), name="is_masked")
    gm.meta[STATE_META_KEY] = state
    gm.recompile()
    report.nodes_after = count_nodes(gm)
    report.details = {"state_node": state.name, "source": state_source.name, "mask_token_id": mask_token_id}
    return gm, report


def token_state_node(gm: fx.GraphModule):
    return gm.meta.get(STATE_META_KEY)
