"""insert_token_state: one state node, the graph's function unchanged."""

import pytest
import torch

from stq_compiler.analysis import analyze
from stq_compiler.passes.token_state import TokenStateError, insert_token_state
from tests.conftest import capture_graphs, tiny_model


def test_one_state_node_and_function_unchanged():
    model = tiny_model("llada")
    mask_id = model.config.mask_token_id
    ids = torch.randint(0, mask_id, (2, 10))
    ids[0, 3:] = mask_id
    (gm, inputs), = capture_graphs(model, ids)
    before = gm(*inputs)
    analysis = analyze(gm, inputs)
    gm, report = insert_token_state(gm, analysis.state_source, mask_id)
    eq_nodes = [n for n in gm.graph.nodes if n.target is torch.eq]
    assert len(eq_nodes) == 1 and gm.meta["stq_token_state"] is eq_nodes[0]
    assert eq_nodes[0].args == (analysis.state_source, mask_id)
    assert report.nodes_delta == 1
    after = gm(*inputs)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_missing_state_source_is_refused():
    model = tiny_model("llada")
    (gm, inputs), = capture_graphs(model, torch.randint(0, 10, (1, 4)))
    with pytest.raises(TokenStateError, match="no token-state source"):
        insert_token_state(gm, None, 5)
