"""insert_tac: one TAC node per attention layer, read by the output projection only, computing the
same function as the eager model with the affine map hooked in front of the projection."""

import operator

import pytest
import torch

from stq_compiler.analysis import analyze
from stq_compiler.calibration.tac import TacParams, tac_group_size
from stq_compiler.passes.quantize_linears import quantize_linears
from stq_compiler.passes.tac import TacError, insert_tac
from tests.conftest import capture_graphs, logits_of, sqnr_db, tiny_model

TAC = torch.ops.stq.tac_block_affine.default


def random_params(channels, seed):
    gen = torch.Generator().manual_seed(seed)
    g = tac_group_size(channels)
    M = torch.eye(g) + 0.3 * torch.randn(channels // g, g, g, generator=gen)
    return TacParams(M, 0.2 * torch.randn(channels, generator=gen))


def captured(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size - 1, (2, 11))
    (gm, inputs), = capture_graphs(model, ids)
    return model, ids, gm, inputs, analyze(gm, inputs)


def projection_params(analysis, make):
    projections = [core.output_projection for core in analysis.attention]
    return {proj.fqn: make(proj.in_features, i) for i, proj in enumerate(projections)}


def hook_projections(model, params):
    """The eager reference: apply each layer's map (einsum, float32) in front of its projection."""

    def hook_for(p):
        nb, g = p.M.shape[0], p.M.shape[1]

        def pre_hook(module, args):
            z = args[0]
            zb = z.float().reshape(*z.shape[:-1], nb, g)
            return (torch.einsum("...bj,bij->...bi", zb, p.M).reshape(z.shape) + p.d).to(z.dtype),

        return pre_hook

    for fqn, p in params.items():
        model.get_submodule(fqn.rsplit(".", 1)[0]).register_forward_pre_hook(hook_for(p))


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_identity_tac_leaves_the_function_unchanged(arch):
    model, ids, gm, inputs, analysis = captured(arch)
    before = gm(*inputs)
    params = projection_params(analysis, lambda c, i: TacParams.identity(c))
    gm, report = insert_tac(gm, analysis, params)
    after = gm(*inputs)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    g = tac_group_size(64)
    assert report.details["tac_nodes"] == 2
    assert report.details["parameter_bytes"] == 2 * (64 // g * g * g + 64) * 4
    assert report.nodes_delta == 2 * 3  # per layer: get_attr M, get_attr d, the TAC node


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_random_tac_matches_hooked_eager_model(arch):
    model, ids, gm, inputs, analysis = captured(arch)
    points = {core.output_projection.fqn: core.tac_point for core in analysis.attention}
    params = projection_params(analysis, lambda c, i: random_params(c, seed=i))
    plain = logits_of(model(ids))
    gm, _ = insert_tac(gm, analysis, params)

    tac_nodes = [n for n in gm.graph.nodes if n.target is TAC]
    assert len(tac_nodes) == len(analysis.attention) == 2
    for core in analysis.attention:
        proj = core.output_projection
        tac = proj.input
        # the projection, and only it, reads the TAC node, which reads the old TAC point
        assert tac in tac_nodes and tac.args[0] is points[proj.fqn] and list(tac.users) == [proj.node]
        assert proj.node.args[0] is tac and core.tac_point is tac
        assert tac.meta["stq_tac"] == {"fqn": proj.fqn, "group": 16}
        site = next(s for s in analysis.sites if proj in s.linears)
        assert site.input is tac and site.linears == [proj]
        m, d = (getattr(gm, a.target) for a in tac.args[1:])
        assert torch.equal(m, params[proj.fqn].M) and torch.equal(d, params[proj.fqn].d)

    hook_projections(model, params)
    with torch.no_grad():
        reference = logits_of(model(ids))
        out = gm(*inputs)
    logits = next(o for o in out if o.shape == reference.shape)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-2)  # the map did change the function


def test_quantize_linears_after_tac_quantizes_the_tac_output():
    from tests.passes.test_quantize_linears import fake_quantize_model

    model, ids, gm, inputs, analysis = captured("llada")
    params = projection_params(analysis, lambda c, i: random_params(c, seed=10 + i))
    gm, _ = insert_tac(gm, analysis, params)
    gm, report = quantize_linears(gm, analysis, 8, 8)
    assert report.details["sites"] == 8  # the o-sites moved to the TAC nodes, none lost or split
    for tac in (n for n in gm.graph.nodes if n.target is TAC):
        (quant,) = tac.users
        assert quant.target is torch.ops.stq.quantize_per_token.default
        linears = [lin for item in quant.users if item.target is operator.getitem for lin in item.users]
        assert {lin.meta["stq_linear"]["fqn"] for lin in linears} == {tac.meta["stq_tac"]["fqn"]}

    reference_model = fake_quantize_model(tiny_model("llada"), 8, 8)
    hook_projections(reference_model, params)  # on the fake-quant modules that replaced the projections
    with torch.no_grad():
        reference = logits_of(reference_model(ids))
        out = gm(*inputs)
    logits = next(o for o in out if o.shape == reference.shape)
    # W8A8 with the TAC output quantized; the tolerance argument is test_quantize_linears'.
    assert sqnr_db(reference, logits) > 45


def test_graph_with_tac_compiles_through_aot_autograd():
    from torch._dynamo.backends.debugging import aot_eager

    model = tiny_model("dream")
    ids = torch.randint(0, 250, (1, 7))
    params = {}

    def backend(gm, example_inputs):
        analysis = analyze(gm, example_inputs)
        params.update(projection_params(analysis, lambda c, i: random_params(c, seed=20 + i)))
        gm, _ = insert_tac(gm, analysis, params)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = logits_of(torch.compile(model, backend=backend)(ids))
        hook_projections(model, params)
        reference = logits_of(model(ids))
    torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)


def test_bad_parameters_are_refused():
    model, ids, gm, inputs, analysis = captured("llada")
    fqn = analysis.attention[0].output_projection.fqn
    with pytest.raises(TacError, match=r"model\.transformer\.blocks\.7\.attn_out\.weight"):
        insert_tac(gm, analysis, {"model.transformer.blocks.7.attn_out.weight": TacParams.identity(64)})
    with pytest.raises(TacError, match="have 32 channels but the projection reads 64"):
        insert_tac(gm, analysis, {fqn: TacParams.identity(32)})
    insert_tac(gm, analysis, {fqn: TacParams.identity(64)})
    with pytest.raises(TacError, match="ran twice"):
        insert_tac(gm, analysis, {fqn: TacParams.identity(64)})


def test_other_readers_of_the_tac_point_keep_reading_it():
    class SharedPoint(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)
            self.o = torch.nn.Linear(32, 32)
            self.probe = torch.nn.Linear(32, 8)
            self.head = torch.nn.Linear(32, 4)

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
            z = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 32)
            return self.head(self.o(z) + self.probe(z).sum(-1, keepdim=True))

    (gm, inputs), = capture_graphs(SharedPoint(), torch.randn(2, 5, 32))
    analysis = analyze(gm, inputs)
    (core,) = analysis.attention
    proj, point = core.output_projection, core.tac_point
    assert proj.fqn == "o.weight"
    (shared,) = [s for s in analysis.sites if proj in s.linears]
    assert len(shared.linears) == 2
    other = next(lin for lin in shared.linears if lin is not proj)
    gm, report = insert_tac(gm, analysis, {proj.fqn: random_params(32, seed=3)})
    (tac,) = [n for n in gm.graph.nodes if n.target is TAC]
    assert list(tac.users) == [proj.node] and other.node.args[0] is point
    # the site split in two: the projection reads the TAC node, the other linear the old point
    assert [s.input for s in analysis.sites if proj in s.linears] == [tac]
    assert [s.input for s in analysis.sites if other in s.linears] == [point]
