"""Site transforms (norm fold, smoothing, Kronecker rotation, state gates) are exact in float."""

import torch
from hypothesis import given, settings, strategies as st

from stq_compiler.analysis import analyze, norm_scale_feeding
from stq_compiler.passes.quantize_linears import quantize_linears, site_key
from stq_compiler.passes.token_state import insert_token_state
from stq_compiler.site_transform import SiteTransform
from tests.conftest import capture_graphs, logits_of, tiny_model


def random_orthogonal(n, gen):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def factors(d):
    d1 = max(i for i in range(1, int(d**0.5) + 1) if d % i == 0)
    return d1, d // d1


def random_transforms(analysis, gen, gates):
    transforms = {}
    for site in analysis.sites:
        d = site.linears[0].in_features
        d1, d2 = factors(d)
        ones = torch.ones(d)
        transforms[site_key(site)] = SiteTransform(
            fold_norm=norm_scale_feeding(site.input, analysis.bindings) is not None,
            smooth=torch.rand(d, generator=gen, dtype=torch.float64) * 4 + 0.25,
            p1=random_orthogonal(d1, gen),
            p2=random_orthogonal(d2, gen),
            gate_masked=ones if gates else None,
            gate_unmasked=ones if gates else None,
        )
    return transforms


@settings(max_examples=8, deadline=None)
@given(
    arch=st.sampled_from(["llada", "dream"]),
    layers=st.integers(1, 2),
    kv_heads=st.sampled_from([1, 2, 4]),
    tokens=st.integers(1, 9),
    batch=st.integers(1, 2),
    masks=st.sampled_from(["all", "none", "random"]),
    seed=st.integers(0, 2**16),
)
def test_transforms_are_exact_with_quantizers_off(arch, layers, kv_heads, tokens, batch, masks, seed):
    overrides = {"n_layers": layers, "n_kv_heads": kv_heads} if arch == "llada" else {"num_hidden_layers": layers, "num_key_value_heads": kv_heads}
    model = tiny_model(arch, seed=seed, **overrides)
    mask_id = model.config.mask_token_id
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, mask_id, (batch, tokens), generator=gen)
    if masks == "all":
        ids[:] = mask_id
    elif masks == "random":
        ids[torch.rand(batch, tokens, generator=gen) < 0.5] = mask_id
    (gm, inputs), = capture_graphs(model, ids)
    analysis = analyze(gm, inputs)
    gm, _ = insert_token_state(gm, analysis.state_source, mask_id)
    transforms = random_transforms(analysis, gen, gates=True)
    gm, report = quantize_linears(gm, analysis, 16, 16, gm.meta["stq_token_state"], transforms=transforms, quantize=False, quantize_head=True)
    assert report.details["sites_transformed"] == len(analysis.sites)
    with torch.no_grad():
        ref = logits_of(model(ids))
        out = next(o for o in gm(*inputs) if o.shape == ref.shape)
    # float32 arithmetic through rotated bases: rounding-level differences only
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@settings(max_examples=30, deadline=None)
@given(d1=st.integers(2, 6), d2=st.integers(2, 6), tokens=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_gates_are_exact_without_leakage(d1, d2, tokens, seed):
    """SGAT: a token that puts no energy in the other state's private columns (in the P basis)
    is transformed exactly: x Wᵀ == gate(x P) (W P)ᵀ."""
    gen = torch.Generator().manual_seed(seed)
    d = d1 * d2
    private = max(1, d // 8)
    gate_m = torch.ones(d, dtype=torch.float64)
    gate_u = torch.ones(d, dtype=torch.float64)
    gate_m[d - private :] = 0  # the last columns are private to unmasked tokens
    gate_u[d - 2 * private : d - private] = 0  # the ones before them private to masked tokens
    t = SiteTransform(p1=random_orthogonal(d1, gen), p2=random_orthogonal(d2, gen), gate_masked=gate_m, gate_unmasked=gate_u)
    p = torch.kron(t.p1, t.p2)
    is_masked = torch.rand(tokens, generator=gen) < 0.5
    z = torch.randn(tokens, d, generator=gen, dtype=torch.float64)
    z = z * torch.where(is_masked[:, None], gate_m, gate_u)  # coordinates confined to the own columns
    x = z @ p.t()  # back to the original basis
    w = torch.randn(5, d, generator=gen, dtype=torch.float64)
    lhs = x @ w.t()
    gated = (x @ p) * torch.where(is_masked[:, None], gate_m, gate_u)
    rhs = gated @ t.fold_weight(w).double().t()
    torch.testing.assert_close(rhs, lhs, rtol=1e-6, atol=1e-6)  # fold_weight returns float32
    # and the graph-side float32 transform agrees
    torch.testing.assert_close(t.transform_activation(x.float(), is_masked).double(), gated, rtol=1e-5, atol=1e-5)


def test_fold_weight_in_row_chunks_is_the_same(monkeypatch):
    # rows fold independently: a few at a time (bounding the float64 temporaries of an 8B head)
    # gives the same float32 weight bit for bit
    from stq_compiler import site_transform

    gen = torch.Generator().manual_seed(3)
    t = SiteTransform(fold_norm=True, smooth=torch.rand(12, generator=gen, dtype=torch.float64) + 0.5,
                      p1=random_orthogonal(3, gen), p2=random_orthogonal(4, gen))
    w, norm = torch.randn(10, 12, generator=gen).half(), torch.rand(12, generator=gen) + 0.5
    whole = t.fold_weight(w, norm)
    monkeypatch.setattr(site_transform, "CHUNK_ROWS", 3)
    assert torch.equal(t.fold_weight(w, norm), whole)
