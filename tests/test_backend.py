"""The starquant backend end to end: registration, exactness when off, RTN quality, errors, breaks."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from stq_compiler.backend import StarQuant
from stq_compiler.options import BackendOptions
from tests.conftest import ARCHS, EmbedsOnly, logits_of, sqnr_db, tiny_model


def _count_ops(gm):
    """The stq quantization ops of the graph, by name (not the LLaDA model's stq::rotary_tables)."""
    counts = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("stq.") and "rotary_tables" not in str(node.target):
            name = str(node.target).split(".")[1]
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_backend_is_registered_through_the_entry_point():
    code = "import torch, sys; sys.exit(0 if 'starquant' in torch._dynamo.list_backends() and 'stq_compiler' not in sys.modules else 1)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_quantization_off_matches_eager(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        ref = logits_of(model(ids))
        out = logits_of(torch.compile(model, backend="starquant", options={"w_bits": 16, "a_bits": 16})(ids))
    # Inductor reorders float32 reductions: rounding-level differences only.
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_w8a8_rtn_is_quantized_and_accurate(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    ids[:, 5:] = model.config.mask_token_id
    backend = StarQuant(w_bits=8, a_bits=8, mask_token_id=model.config.mask_token_id)
    with torch.no_grad():
        ref = logits_of(model(ids))
        out = logits_of(torch.compile(model, backend=backend)(ids))
    (result,) = backend.results
    layers = 2
    # every linear but the LM head, one activation quantizer per site (qkv, o, gate_up, down)
    assert _count_ops(result.gm) == {"quantize_per_token": 4 * layers, "quantized_linear": 7 * layers}
    state_nodes = [n for n in result.gm.graph.nodes if n.name.startswith("is_masked")]
    assert len(state_nodes) == 1
    quantizers = [n for n in result.gm.graph.nodes if "quantize_per_token" in str(n.target)]
    assert all(q.kwargs.get("is_masked") is state_nodes[0] for q in quantizers)
    assert not torch.equal(out, ref)
    assert sqnr_db(ref, out) >= 25.0


def test_w4a4_compiles_and_stays_correlated():
    model = tiny_model("llada")
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        ref = logits_of(model(ids))
        out = logits_of(torch.compile(model, backend="starquant", options={"w_bits": 4, "a_bits": 4, "inductor": False})(ids))
    # 4-bit RTN on random weights: far noisier than W8A8, but still the same function.
    assert 3.0 < sqnr_db(ref, out) < 25.0


def test_quantized_model_gives_the_same_logits_under_every_grad_mode():
    # a quantized graph runs without autograd whatever the caller's mode: with grad enabled (its
    # parameters require grad, the stq ops have no gradient), under no_grad and under inference_mode
    model = tiny_model("llada")
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    ids[:, 8:] = model.config.mask_token_id
    fn = torch.compile(model, backend=StarQuant(w_bits=8, a_bits=8, inductor=False))
    assert any(p.requires_grad for p in model.parameters())
    out = logits_of(fn(ids))
    assert not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(logits_of(fn(ids)), out, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(logits_of(fn(ids)), out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"wbits": 4}, ValueError, "unknown option.*'wbits'"),
        ({"w_bits": 3, "a_bits": 3}, ValueError, "w_bits=3 is not a supported bit width"),
        ({"w_bits": 4, "a_bits": 16}, ValueError, "w_bits=4 with a_bits=16"),
        ({"token_state": "required"}, ValueError, "needs the mask token id"),
        ({"token_state": "sometimes", "mask_token_id": 1}, ValueError, "token_state='sometimes'"),
        ({"quantize_embedding": "yes"}, ValueError, "quantize_embedding must be True or False"),
        ({"mode": "fast"}, ValueError, "mode='fast'; choose one of"),
        ({"swiglu_epilogue": "on"}, ValueError, "swiglu_epilogue must be True or False"),
        ({"mode": "reduce-overhead", "inductor": False}, ValueError, "is an Inductor mode"),
    ],
)
def test_bad_options_fail_clearly(options, error, match):
    model = tiny_model("llada")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    # Dynamo wraps what a backend raises in BackendCompilerFailed; the cause is ours, and its
    # message reaches the user.
    with pytest.raises(Exception, match=match) as info:
        torch.compile(model, backend="starquant", options=options)(ids)
    assert isinstance(getattr(info.value, "inner_exception", info.value), error)


def test_required_state_without_input_ids_fails_clearly():
    compiled = torch.compile(EmbedsOnly(), backend="starquant", options={"token_state": "required", "mask_token_id": 5, "inductor": False})
    with pytest.raises(Exception, match="no token-state source"):
        compiled(torch.randn(2, 3, 8))


def test_graph_break_both_graphs_quantized():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 16)
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 16)
            self.head = nn.Linear(16, 32)

        def forward(self, input_ids):
            h = torch.relu(self.a(self.emb(input_ids)))
            torch._dynamo.graph_break()
            return self.head(torch.relu(self.b(h)))

    model = Broken().eval()
    ids = torch.randint(0, 32, (2, 5))
    backend = StarQuant(w_bits=8, a_bits=8)
    with torch.no_grad():
        ref = model(ids)
        out = torch.compile(model, backend=backend)(ids)
    assert len(backend.results) == 2
    assert [_count_ops(r.gm) for r in backend.results] == [{"quantize_per_token": 1, "quantized_linear": 1}] * 2
    assert sqnr_db(ref, out) >= 25.0


def test_debug_dir_gets_the_graph_after_each_pass(tmp_path):
    model = tiny_model("llada")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    options = {"w_bits": 8, "a_bits": 8, "mask_token_id": model.config.mask_token_id, "debug_dir": str(tmp_path), "inductor": False}
    torch.compile(model, backend="starquant", options=options)(ids)
    files = sorted(p.name for p in (tmp_path / "graph_0").iterdir())
    assert files == ["00_captured.py", "01_insert_token_state.py", "02_quantize_linears.py"]
    assert "stq.quantized_linear" in (tmp_path / "graph_0" / "02_quantize_linears.py").read_text()


class _OnCuda:
    is_cuda = True


def test_compile_mode_defaults_to_cuda_graphs_for_quantized_cuda_graphs():
    default = BackendOptions.from_dict({})
    assert default.mode is None
    assert default.mode_for([torch.zeros(2), _OnCuda()]) == "reduce-overhead"
    assert default.mode_for([torch.zeros(2)]) == "default"
    assert BackendOptions.from_dict({"w_bits": 16, "a_bits": 16}).mode_for([_OnCuda()]) == "default"
    assert BackendOptions.from_dict({"mode": "default"}).mode_for([_OnCuda()]) == "default"
    assert BackendOptions.from_dict({"mode": "max-autotune"}).mode_for([torch.zeros(2)]) == "max-autotune"


@pytest.mark.parametrize(
    "compile_kwargs,cudagraphs",
    [
        ({"backend": "starquant", "options": {"w_bits": 8, "a_bits": 8}}, False),  # CPU weights: no CUDA graphs
        ({"backend": "starquant", "mode": "reduce-overhead"}, True),  # torch.compile's own mode= reaches Inductor
        ({"backend": "starquant", "options": {"w_bits": 8, "a_bits": 8, "mode": "reduce-overhead"}}, True),
        ({"backend": StarQuant(mode="reduce-overhead", w_bits=8, a_bits=8)}, True),
    ],
)
def test_the_compile_mode_reaches_inductor(compile_kwargs, cudagraphs, monkeypatch):
    import torch._inductor.compile_fx as inductor

    seen = []

    def compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", compile_fx)
    model = tiny_model("llada", n_layers=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        torch.compile(model, **compile_kwargs)(ids)
    assert seen and all(patches.get("triton.cudagraphs", False) == cudagraphs for patches in seen)


def test_a_mode_beside_a_different_mode_option_is_refused():
    from stq_compiler.backend import _with_mode

    assert _with_mode({"mode": "default"}, "default") == {"mode": "default"}
    with pytest.raises(ValueError, match="contradicts option mode"):
        _with_mode({"mode": "default"}, "reduce-overhead")
