"""Compile-time constants are shared between the graphs of one model: a second compile (another
input shape) holds the first one's quantized weights, not a copy; changed weights are not shared."""

from __future__ import annotations

import gc

import torch

from stq_compiler import StarQuant
from stq_compiler.passes import shared_constant
from tests.conftest import logits_of, tiny_model


def test_an_equal_tensor_under_the_same_name_is_shared_while_it_lives():
    a = torch.randint(-8, 8, (4, 6), dtype=torch.int8)
    assert shared_constant("stq_test_w4_q", a) is a
    assert shared_constant("stq_test_w4_q", a.clone()) is a
    other = a.clone()
    other[0, 0] += 1
    assert shared_constant("stq_test_w4_q", other) is other  # different values: its own tensor
    assert shared_constant("stq_test_w4_q", other.clone()) is other
    assert shared_constant("stq_other_w4_q", a.clone()) is not a  # another name
    assert shared_constant("stq_test_w4_q", a.float()) is not a  # another dtype
    del a, other
    gc.collect()
    fresh = torch.zeros(4, 6, dtype=torch.int8)
    assert shared_constant("stq_test_w4_q", fresh) is fresh  # nothing left to share


def _ids(model, length):
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, model.config.mask_token_id, (1, length), generator=gen)
    ids[0, ::2] = model.config.mask_token_id
    return ids


def _constants(gm):
    return {name: t for name, t in gm.named_buffers() if name.startswith("stq_")}


def test_a_second_shape_shares_the_first_ones_quantized_weights():
    model = tiny_model("llada", n_layers=2)
    changed = "model.transformer.blocks.1.ff_out.weight"
    backend = StarQuant(w_bits=4, a_bits=4, mask_token_id=model.config.mask_token_id, inductor=False)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(_ids(model, 8))
        compiled(_ids(model, 12))
    first, second = (_constants(r.gm) for r in backend.results)
    assert first.keys() == second.keys() and first
    assert all(second[name] is first[name] for name in first)

    # a weight changed in place before a third shape: its constants are its own, the rest shared
    params = dict(model.named_parameters())
    assert changed in params, sorted(params)[:8]
    with torch.no_grad():
        params[changed].mul_(1.5)
        out = logits_of(compiled(_ids(model, 16)))
    third = _constants(backend.results[2].gm)
    own = {name for name in third if third[name] is not first[name]}
    assert own and all("ff_out" in name and "blocks_1" in name for name in own)
    # and it computes what a compile of the changed model alone computes
    torch._dynamo.reset()
    alone = StarQuant(w_bits=4, a_bits=4, mask_token_id=model.config.mask_token_id, inductor=False)
    with torch.no_grad():
        assert torch.equal(out, logits_of(torch.compile(model, backend=alone, dynamic=False)(_ids(model, 16))))
