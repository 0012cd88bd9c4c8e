"""release_float_weights: after a starquant compile, the float weights no compiled graph reads are
given back, the compiled model computes the same, and a compile that would need them is refused."""

from __future__ import annotations

import pytest
import torch

import stq_compiler
from stq_compiler import StarQuant, release_float_weights
from stq_compiler.passes.quantize_linears import eligible
from tests.conftest import tiny_model


def _ids(model, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.mask_token_id, (1, length), generator=gen)
    ids[0, ::3] = model.config.mask_token_id
    return ids


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("inductor", [False, True], ids=["fx", "inductor"])
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_unread_weights_are_given_back_and_the_outputs_stay(arch, inductor):
    model = tiny_model(arch, n_layers=2)
    torch._dynamo.reset()
    backend = StarQuant(w_bits=4, a_bits=4, mask_token_id=model.config.mask_token_id, inductor=inductor)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    ids = _ids(model, 16)
    with torch.no_grad():
        before = _logits(compiled(ids)).clone()
    quantized = {lin.fqn for result in backend.results for lin in result.analysis.linears if eligible(lin, False)}
    params = dict(model.named_parameters())
    expected = sum(params[name].untyped_storage().nbytes() for name in quantized)
    assert expected > 0

    freed = release_float_weights(model)
    assert freed == expected
    for name, p in params.items():
        # the quantized linears' weights are gone; the embedding, norms and float head are kept
        assert (p.untyped_storage().nbytes() == 0) == (name in quantized), name
    with torch.no_grad():
        after = _logits(compiled(ids))
    assert torch.equal(before, after)
    assert release_float_weights(model) == 0  # nothing left to give back

    # another input shape needs a new graph, which needs the float weights: refused, by name
    with pytest.raises(Exception, match="release_float_weights") as info:
        with torch.no_grad():
            compiled(_ids(model, 24))
    assert any(name in str(info.value) for name in quantized)


def test_a_model_never_compiled_keeps_everything():
    model = tiny_model("llada", n_layers=1)
    sizes = {n: p.untyped_storage().nbytes() for n, p in model.named_parameters()}
    assert release_float_weights(model) == 0
    assert {n: p.untyped_storage().nbytes() for n, p in model.named_parameters()} == sizes
    assert stq_compiler.release_float_weights is release_float_weights


def test_only_live_compiled_graphs_count():
    # A graph that reads the head keeps it; once Dynamo drops that graph, a new compile that
    # quantizes the head lets it go.
    import gc

    model = tiny_model("llada", n_layers=1)
    ids = _ids(model, 16)
    head = next(p for n, p in model.named_parameters() if n.endswith("ff_out.weight") and "blocks" not in n)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=StarQuant(w_bits=8, a_bits=8, inductor=False))(ids)
    assert head.untyped_storage().nbytes() > 0
    assert all(t is not head for _, t in stq_compiler.release.releasable(model))
    torch._dynamo.reset()
    gc.collect()
    compiled = torch.compile(model, backend=StarQuant(w_bits=8, a_bits=8, quantize_head=True, inductor=False))
    with torch.no_grad():
        before = _logits(compiled(ids)).clone()
    assert any(t is head for _, t in stq_compiler.release.releasable(model))
    release_float_weights(model)
    assert head.untyped_storage().nbytes() == 0
    with torch.no_grad():
        assert torch.equal(_logits(compiled(ids)), before)


def test_with_dynamic_shapes_one_compile_serves_every_length_after_release():
    # dynamic=True: the graphs of the first call serve later sequence lengths too, so releasing
    # the float weights leaves every length usable (the docs recommend it for varying prompts)
    model = tiny_model("llada", n_layers=2)
    torch._dynamo.reset()
    backend = StarQuant(w_bits=4, a_bits=4, mask_token_id=model.config.mask_token_id, inductor=False)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        compiled(_ids(model, 16))
        graphs = len(backend.results)
        expected = {length: _logits(compiled(_ids(model, length, seed=length))).clone() for length in (24, 33)}
        assert len(backend.results) == graphs
        assert release_float_weights(model) > 0
        for length, want in expected.items():
            assert torch.equal(_logits(compiled(_ids(model, length, seed=length))), want)
        assert len(backend.results) == graphs
