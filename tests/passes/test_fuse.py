"""fuse_quantized_sites: one fused quantizer per site (norm, TAC, smoothing and Kronecker absorbed),
one fused GEMM per q/k/v group, SwiGLU pair or linear (residual adds absorbed), packed 4-bit weights; on a
float32 model the fused graph computes exactly what the unfused one did."""

import operator

import pytest
import torch
import torch.nn.functional as F

from stq_compiler.analysis import analyze
from stq_compiler.fused_ops import BLOCK_CODES, unpack_int4_blocks
from stq_compiler.passes.fuse import (
    FUSED_LINEAR,
    FUSED_QUANTIZE,
    LINEAR,
    QUANTIZE,
    fuse_quantized_sites,
)
from stq_compiler.passes.quantize_linears import quantize_linears
from stq_compiler.passes.tac import insert_tac
from stq_compiler.passes.token_state import insert_token_state
from tests.conftest import capture_graphs, logits_of, sqnr_db, tiny_model
from tests.passes.test_site_transforms import random_transforms
from tests.passes.test_tac import random_params

LAYERS = 2


def quantized_graph(arch, w_bits, a_bits, transformed, dtype=torch.float32):
    overrides = {"n_layers": LAYERS} if arch == "llada" else {"num_hidden_layers": LAYERS}
    model = tiny_model(arch, **overrides).to(dtype)
    mask_id = model.config.mask_token_id
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, mask_id, (2, 9), generator=gen)
    ids[0, 4:] = mask_id
    (gm, inputs), = capture_graphs(model, ids)
    analysis = analyze(gm, inputs)
    gm, _ = insert_token_state(gm, analysis.state_source, mask_id)
    transforms = None
    if transformed:
        params = {c.output_projection.fqn: random_params(c.output_projection.in_features, i) for i, c in enumerate(analysis.attention)}
        gm, _ = insert_tac(gm, analysis, params)
        transforms = random_transforms(analysis, gen, gates=True)
    gm, _ = quantize_linears(gm, analysis, w_bits, a_bits, gm.meta["stq_token_state"], transforms=transforms)
    return gm, inputs, analysis


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def run(gm, inputs):
    with torch.no_grad():
        return [o for o in gm(*inputs) if isinstance(o, torch.Tensor)]


@pytest.mark.parametrize("swiglu", [False, True], ids=["stacked-gate-up", "swiglu-epilogue"])
@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (8, 8), (4, 8)], ids=["w4a4", "w8a8", "w4a8"])
@pytest.mark.parametrize("transformed", [True, False], ids=["starquant", "rtn"])
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_fused_graph_is_exact_on_float32_models(arch, transformed, w_bits, a_bits, swiglu):
    gm, inputs, _ = quantized_graph(arch, w_bits, a_bits, transformed)
    before = run(gm, inputs)
    sites, linears = targets(gm).count(QUANTIZE), targets(gm).count(LINEAR)
    gm, report = fuse_quantized_sites(gm, swiglu_epilogue=swiglu)
    after = run(gm, inputs)
    assert len(before) == len(after) and all(torch.equal(b, a) for b, a in zip(before, after))

    d = report.details
    found = targets(gm)
    assert QUANTIZE not in found and LINEAR not in found
    assert found.count(FUSED_QUANTIZE) == sites == d["sites_fused"] == 4 * LAYERS
    assert d["residual"] == 2 * LAYERS  # o and down
    if swiglu:  # gate/up: one SwiGLU GEMM; q/k/v: one GEMM over the stacked weights, split after
        assert d["swiglu"] == LAYERS and d["concatenated"] == LAYERS
        assert found.count(FUSED_LINEAR) == linears - d["swiglu"] - 2 * d["concatenated"]
    else:  # q/k/v and gate/up each one GEMM over stacked weights; the SiLU·mul stays in the graph
        assert d["swiglu"] == 0 and d["concatenated"] == 2 * LAYERS
        assert found.count(FUSED_LINEAR) == linears - 3 * LAYERS
        assert found.count(F.silu) == LAYERS
    assert d["linears_fused"] == linears
    assert d["rms_norm"] == 2 * LAYERS  # the q/k/v and gate/up inputs
    if transformed:  # norm weights folded into W; every site rotated and smoothed, TAC in front of o
        assert (d["kron"], d["smooth"], d["tac"], d["norm_weight"]) == (sites, sites, LAYERS, 0)
    else:
        assert (d["kron"], d["smooth"], d["tac"], d["norm_weight"]) == (0, 0, 0, 2 * LAYERS)
    # nothing left between a site's input and its fused quantizer: the norm's ops are gone
    assert not any(n.op == "call_function" and n.target is torch.rsqrt and any(u.target is FUSED_QUANTIZE for u in n.users)
                   for n in gm.graph.nodes)
    assert all(not (n.op == "call_function" and n.target is operator.add and any(a.target is FUSED_LINEAR for a in n.all_input_nodes if a.op == "call_function"))
               for n in gm.graph.nodes)


def test_weights_are_packed_and_int8_codes_dropped():
    gm, _, _ = quantized_graph("llada", 4, 4, transformed=False)
    int8_bytes = sum(b.numel() for name, b in gm.named_buffers() if b.dtype == torch.int8)
    old = {name: b.clone() for name, b in gm.named_buffers() if b.dtype == torch.int8}
    old_buffers = dict(gm.named_buffers())
    gm, report = fuse_quantized_sites(gm, swiglu_epilogue=True)
    assert not any(b.dtype == torch.int8 for _, b in gm.named_buffers())
    packed = {name: b for name, b in gm.named_buffers() if b.dtype == torch.uint8}
    # two codes a byte, K in blocks of 128 (padded: half the int8 bytes when K is a multiple of 128)
    blocked_bytes = sum(b.shape[0] * -(-b.shape[1] // BLOCK_CODES) * BLOCK_CODES // 2 for b in old.values())
    assert sum(b.numel() for b in packed.values()) == blocked_bytes
    assert all(b.dim() == 3 for b in packed.values())  # the blocked layout: [N, blocks, 64]
    # the SwiGLU pairs' scales and sums were replaced by concatenated ones too
    scales_and_sums = sum(b.numel() * b.element_size() for name, b in old_buffers.items() if name not in gm._buffers
                          and b.dtype != torch.int8)
    assert report.details["weight_bytes_freed"] == int8_bytes + scales_and_sums
    for name, codes in old.items():
        if name + "_packed" in packed:
            assert torch.equal(unpack_int4_blocks(packed[name + "_packed"], codes.shape[1]), codes)
    # SwiGLU pairs: one weight, gate rows then up rows
    gate_up = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is FUSED_LINEAR and n.args[8]]
    assert len(gate_up) == LAYERS
    assert all(n.meta["stq_linear"]["epilogue"] == "swiglu" for n in gate_up)


def test_w4a8_runs_what_w4a4_runs_with_8_bit_activation_codes():
    # Hopper has no 4-bit MMA: 4-bit activation codes are held one a byte (pack=False) and the W4
    # GEMM reads int8 codes either way, so W4A8 launches the same ops on the same buffers as W4A4;
    # only the activation quantizer's bits differ (the README's speed section relies on this).
    graphs = {}
    for a_bits in (4, 8):
        gm, inputs, _ = quantized_graph("llada", 4, a_bits, transformed=True)
        graphs[a_bits] = (fuse_quantized_sites(gm)[0], inputs)
    (g4, _), (g8, _) = graphs[4], graphs[8]
    assert targets(g4) == targets(g8)
    b4, b8 = dict(g4.named_buffers()), dict(g8.named_buffers())
    assert b4.keys() == b8.keys() and all(torch.equal(b4[k], b8[k]) for k in b4)
    q4 = [n for n in g4.graph.nodes if n.op == "call_function" and n.target is FUSED_QUANTIZE]
    q8 = [n for n in g8.graph.nodes if n.op == "call_function" and n.target is FUSED_QUANTIZE]
    assert len(q4) == len(q8) == 4 * LAYERS
    for n4, n8 in zip(q4, q8):
        assert (n4.args[1], n8.args[1]) == (4, 8)
        assert n4.kwargs.keys() == n8.kwargs.keys() and n4.kwargs["pack"] is n8.kwargs["pack"] is False
    # the codes the GEMMs read: int8 one a byte in both, 4-bit ones within [-8, 7]
    codes = {}
    for a_bits, (gm, inputs) in graphs.items():
        for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is FUSED_QUANTIZE]:
            with gm.graph.inserting_after(node):
                q = gm.graph.call_function(operator.getitem, (node, 0))
                gm.graph.output_node().args = (tuple(gm.graph.output_node().args[0]) + (q,),)
        gm.recompile()
        with torch.no_grad():
            out = gm(*inputs)
        codes[a_bits] = out[-4 * LAYERS:]
    assert all(c.dtype == torch.int8 for c in codes[4] + codes[8])
    assert [c.shape for c in codes[4]] == [c.shape for c in codes[8]]
    assert all(-8 <= int(c.min()) and int(c.max()) <= 7 for c in codes[4])
    assert any(int(c.abs().max()) > 8 for c in codes[8])


@pytest.mark.parametrize("bits", [(4, 4), (8, 8)], ids=["w4a4", "w8a8"])
def test_fused_graph_as_accurate_on_bfloat16_models(bits):
    # bfloat16: the fused ops skip the roundings between stages, so codes near a tie flip and the
    # two graphs differ by about the quantization noise; but they are as close to the float model
    gm, inputs, _ = quantized_graph("llada", *bits, transformed=False, dtype=torch.bfloat16)
    model = tiny_model("llada", n_layers=LAYERS).to(torch.bfloat16)
    ids = next(i for i in inputs if i.dtype == torch.long)
    with torch.no_grad():
        reference = logits_of(model(ids)).float()
    unfused = next(o for o in run(gm, inputs) if o.shape == reference.shape).float()
    gm, _ = fuse_quantized_sites(gm)
    fused = next(o for o in run(gm, inputs) if o.shape == reference.shape).float()
    assert abs(sqnr_db(reference, fused) - sqnr_db(reference, unfused)) < 1.5


def test_fused_graph_compiles():
    gm, inputs, _ = quantized_graph("dream", 4, 4, transformed=True)
    gm, _ = fuse_quantized_sites(gm)
    expected = run(gm, inputs)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = [o for o in torch.compile(gm, backend="aot_eager", fullgraph=True)(*inputs) if isinstance(o, torch.Tensor)]
    assert all(torch.equal(e, c) for e, c in zip(expected, compiled))


def test_shared_norm_output_is_left_alone():
    # a norm output read by something besides the site must stay; the fused op then reads it
    gm, inputs, _ = quantized_graph("llada", 4, 4, transformed=False)
    graph = gm.graph
    quantizers = [n for n in graph.nodes if n.op == "call_function" and n.target is QUANTIZE]
    site_input = quantizers[0].args[0]
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        extra = graph.call_function(torch.sum, (site_input,))
    out.args = ((*out.args[0], extra),) if isinstance(out.args[0], tuple) else ([*out.args[0], extra],)
    gm.recompile()
    before = run(gm, inputs)
    gm, report = fuse_quantized_sites(gm)
    assert torch.equal(run(gm, inputs)[-1], before[-1])
    assert report.details["rms_norm"] == 2 * LAYERS - 1 and report.details["norm_weight"] == 2 * LAYERS - 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_fused_graph_on_cuda_runs_the_kernels_as_accurately(arch):
    # On CUDA both graphs run Triton kernels (the fused ones: bf16x3 Kronecker, packed GEMM), so
    # they differ at rounding ties; against the float model they must be equally accurate.
    overrides = {"n_layers": LAYERS} if arch == "llada" else {"num_hidden_layers": LAYERS}
    model = tiny_model(arch, **overrides).cuda()
    mask_id = model.config.mask_token_id
    ids = torch.randint(0, mask_id, (2, 33), generator=torch.Generator().manual_seed(3)).cuda()
    ids[0, 16:] = mask_id
    (gm, inputs), = capture_graphs(model, ids)
    analysis = analyze(gm, inputs)
    gm, _ = insert_token_state(gm, analysis.state_source, mask_id)
    gm, _ = quantize_linears(gm, analysis, 4, 4, gm.meta["stq_token_state"])
    with torch.no_grad():
        reference = logits_of(model(ids)).float()
    unfused = next(o for o in run(gm, inputs) if o.shape == reference.shape).float()
    gm, report = fuse_quantized_sites(gm)
    fused = next(o for o in run(gm, inputs) if o.shape == reference.shape).float()
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = next(o for o in torch.compile(gm)(*inputs) if isinstance(o, torch.Tensor) and o.shape == reference.shape).float()
    s_unfused, s_fused, s_compiled = (sqnr_db(reference, y) for y in (unfused, fused, compiled))
    print(f"[stq-cuda] fuse pass {arch} W4A4: SQNR vs float unfused {s_unfused:.2f} dB fused {s_fused:.2f} dB "
          f"compiled {s_compiled:.2f} dB, {report.details}")
    assert abs(s_fused - s_unfused) < 1.5 and abs(s_compiled - s_fused) < 0.5


@pytest.fixture(scope="module")
def bundled_case():
    """The bundled model (float32), its shipped STaR-Quant W4A4 recipe (Kronecker P, gates, TAC),
    and ids half prompt, half masks."""
    from stq_compiler.models import DEFAULT_MODEL, load
    from stq_compiler.models.bundled import recipe_path

    model = load(DEFAULT_MODEL, dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 12:] = model.config.mask_token_id
    return model, recipe_path(DEFAULT_MODEL, "starquant-w4a4"), ids


def _compiled_logits(model, ids, **options):
    from stq_compiler.backend import StarQuant

    torch._dynamo.reset()
    backend = StarQuant(**options)
    with torch.no_grad():
        return logits_of(torch.compile(model, backend=backend)(ids)), backend


def test_backend_fuse_option_on_the_bundled_model_and_recipe(bundled_case):
    """options={"fuse": True}: the fused graph computes what the unfused one does (float32 model,
    reference ops: exactly)."""
    model, recipe, ids = bundled_case
    outputs = {}
    for fuse in (False, True):
        outputs[fuse], backend = _compiled_logits(model, ids, recipe=recipe, fuse=fuse, inductor=False)
        ops = targets(backend.results[0].gm)
        assert (FUSED_LINEAR in ops) == fuse and (LINEAR in ops) != fuse
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=0)
    # options={"swiglu_epilogue": True}: gate/up as SwiGLU GEMMs, the same logits
    swiglu, backend = _compiled_logits(model, ids, recipe=recipe, fuse=True, swiglu_epilogue=True, inductor=False)
    gm = backend.results[0].gm
    gate_up = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is FUSED_LINEAR and n.args[8]]
    assert len(gate_up) == model.config.n_layers and F.silu not in targets(gm)
    torch.testing.assert_close(swiglu, outputs[False], rtol=0, atol=0)


def test_backend_fuse_option_under_inductor(bundled_case):
    """The fused graph through Inductor: the same model as the unfused one through Inductor, up to
    float32 summation order (measured 135 dB); 60 dB is far below that and far above what one
    flipped 4-bit code, let alone a different quantization, would leave (W4A4 noise is 10-20 dB)."""
    model, recipe, ids = bundled_case
    unfused, _ = _compiled_logits(model, ids, recipe=recipe, fuse=False)
    fused, _ = _compiled_logits(model, ids, recipe=recipe, fuse=True)
    assert sqnr_db(unfused, fused) > 60


def test_fuse_option_is_validated():
    from stq_compiler.options import BackendOptions

    with pytest.raises(ValueError, match="fuse must be True, False or None"):
        BackendOptions.from_dict({"fuse": "yes"})
    with pytest.raises(ValueError, match="fuse=True fuses quantized linears"):
        BackendOptions.from_dict({"fuse": True, "w_bits": 16, "a_bits": 16})


class _OnCuda:
    is_cuda = True


def test_fuse_default_follows_the_weights_device():
    # None (the default): on for a graph reading CUDA tensors, off for CPU ones and without
    # quantized linears; an explicit True or False wins.
    from stq_compiler.options import BackendOptions

    default = BackendOptions.from_dict({})
    assert default.fuse is None
    assert default.fuse_for([torch.zeros(2), _OnCuda()])
    assert not default.fuse_for([torch.zeros(2)])
    assert not BackendOptions.from_dict({"w_bits": 16, "a_bits": 16}).fuse_for([_OnCuda()])
    assert not BackendOptions.from_dict({"fuse": False}).fuse_for([_OnCuda()])
    assert BackendOptions.from_dict({"fuse": True}).fuse_for([torch.zeros(2)])


def test_default_on_the_cpu_is_unfused(bundled_case):
    model, recipe, ids = bundled_case
    _, backend = _compiled_logits(model, ids, recipe=recipe, inductor=False)
    ops = targets(backend.results[0].gm)
    assert LINEAR in ops and FUSED_LINEAR not in ops
