"""Capture: parameter binding by fully qualified name, and the token-state source."""

import torch

from stq_compiler.capture import bind_tensors, find_token_state_source, fqn_from_source
from tests.conftest import ARCHS, EmbedsOnly, capture_graphs, tiny_model


def test_fqn_from_dynamo_sources():
    assert fqn_from_source("L['self']._modules['transformer']._modules['blocks']._modules['0']._modules['q_proj']._parameters['weight']") == "transformer.blocks.0.q_proj.weight"
    assert fqn_from_source("L['args'][0]._modules['model']._modules['rotary_emb']._buffers['inv_freq']") == "model.rotary_emb.inv_freq"
    assert fqn_from_source("L['self']._parameters['w']") == "w"
    assert fqn_from_source("L['input_ids']") is None


def test_every_parameter_is_bound_to_its_name_and_tensor():
    for arch in ARCHS:
        model = tiny_model(arch)
        ids = torch.randint(0, model.config.vocab_size, (2, 9))
        (gm, inputs), = capture_graphs(model, ids)
        bindings = bind_tensors(gm, inputs)
        params = dict(model.named_parameters())
        bound = {b.fqn: b.tensor for b in bindings.values() if b.is_parameter}
        assert set(bound) == set(params), arch
        for name, tensor in bound.items():
            assert tensor is params[name] or tensor.data_ptr() == params[name].data_ptr(), name
        state = find_token_state_source(gm, inputs)
        assert state is not None and inputs[[n for n in gm.graph.nodes if n.op == "placeholder"].index(state)] is not None


def test_no_state_source_without_input_ids():
    (gm, inputs), = capture_graphs(EmbedsOnly(), torch.randn(2, 3, 8))
    assert find_token_state_source(gm, inputs) is None
