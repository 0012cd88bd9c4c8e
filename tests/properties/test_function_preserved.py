"""With quantizers off, each pass keeps the model's function.

* insert_token_state: outputs bit for bit; its state node computes ``input_ids == mask id``.
* insert_tac with M = I, d = 0 (any block size): outputs bit for bit.
* quantize_linears(quantize=False) with random site transforms (norm fold, smoothing, Kronecker or
  dense rotation, all-ones gates; any subset of sites, the LM head or not, after TAC or not): the
  same function up to float32 rounding. (tests/passes/test_site_transforms.py covers LLaDA/Dream with
  every part on every site; this adds Llama/Qwen2, biases, non-unit norm weights, mixed parts.)
* With SGAT gates that zero private columns the function changes on purpose: the graph must then
  compute what the transforms say for each token's state, checked against the eager model with
  each linear's output replaced by ``T(x, state) · W''ᵀ + b``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from hypothesis import given, strategies as st

from stq_compiler.analysis import norm_scale_feeding
from stq_compiler.calibration.tac import TacParams, tac_group_size
from stq_compiler.passes.quantize_linears import quantize_linears, site_key
from stq_compiler.passes.tac import insert_tac
from stq_compiler.passes.token_state import STATE_META_KEY, insert_token_state
from stq_compiler.site_transform import SiteTransform
from tests.conftest import logits_of
from tests.properties.dllm import (
    MASK_ID,
    TinyConfig,
    batch_shapes,
    captured,
    make_ids,
    mask_patterns,
    random_transforms,
    run_graph,
    tiny_configs,
)

# float32 through rotated, rescaled bases: rounding-level differences, relative to the largest logit
RTOL = 1e-4

MUTANT = TinyConfig("llama", layers=1, heads=4, kv_heads=2, head_dim=8, mlp_ratio=2, bias=True, seed=1)


# ---------------------------------------------------------------------------------------------
# the property checks


def output_differences(reference, candidate, what: str, rtol: float = 0.0) -> list[str]:
    """Outputs that differ: bit for bit when ``rtol`` is 0, else beyond ``rtol · max|reference|``."""
    if len(reference) != len(candidate):
        return [f"{what}: {len(candidate)} outputs instead of {len(reference)}"]
    problems = []
    for i, (ref, out) in enumerate(zip(reference, candidate)):
        if not isinstance(ref, torch.Tensor):
            continue
        if out.shape != ref.shape or out.dtype != ref.dtype:
            problems.append(f"{what}: output {i} is {tuple(out.shape)} {out.dtype}, was {tuple(ref.shape)} {ref.dtype}")
            continue
        diff = (out.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
        allowed = rtol * ref.double().abs().max().item() if ref.numel() else 0.0
        if (rtol == 0 and not torch.equal(out, ref)) or diff > allowed:
            problems.append(f"{what}: output {i} changed, max |diff| {diff:.3g} (allowed {allowed:.3g})")
    return problems


def node_value(gm: fx.GraphModule, inputs: list, node: fx.Node):
    """The value ``node`` takes when ``gm`` runs on ``inputs``."""
    seen = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n is node:
                seen["value"] = result
            return result

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return seen.get("value")


def token_state_problems(cap, ids, insert=insert_token_state) -> list[str]:
    gm, analysis, _ = cap.fresh()
    inputs = cap.inputs_with(ids)
    before = run_graph(gm, inputs)
    gm, _ = insert(gm, analysis.state_source, MASK_ID)
    problems = output_differences(before, run_graph(gm, inputs), "insert_token_state")
    state = gm.meta.get(STATE_META_KEY)
    if state is None:
        return problems + ["insert_token_state recorded no state node"]
    value = node_value(gm, inputs, state)
    expected = ids == MASK_ID
    if not isinstance(value, torch.Tensor) or value.shape != expected.shape or not torch.equal(value, expected):
        wrong = (value != expected).sum().item() if isinstance(value, torch.Tensor) and value.shape == expected.shape else "all"
        problems.append(f"the state node is not input_ids == {MASK_ID}: wrong at {wrong} of {ids.numel()} tokens")
    return problems


def identity_tac_problems(cap, ids, group_for=lambda channels: None, insert=insert_tac) -> list[str]:
    gm, analysis, _ = cap.fresh()
    inputs = cap.inputs_with(ids)
    before = run_graph(gm, inputs)
    projections = [core.output_projection for core in analysis.attention if core.output_projection is not None]
    params = {p.fqn: TacParams.identity(p.in_features, group_for(p.in_features)) for p in projections}
    gm, report = insert(gm, analysis, params)
    problems = output_differences(before, run_graph(gm, inputs), "insert_tac (M = I, d = 0)")
    if report.details["tac_nodes"] != len(params):
        problems.append(f"insert_tac inserted {report.details['tac_nodes']} TAC nodes for {len(params)} projections")
    return problems


def float_transform_problems(cap, ids, seed, gates, quantize_head, tac_first, apply=quantize_linears) -> list[str]:
    """quantize_linears(quantize=False) with random exact transforms keeps the function."""
    gm, analysis, _ = cap.fresh()
    inputs = cap.inputs_with(ids)
    before = run_graph(gm, inputs)
    gm, _ = insert_token_state(gm, analysis.state_source, MASK_ID)
    if tac_first:
        gm, _ = insert_tac(gm, analysis, {c.output_projection.fqn: TacParams.identity(c.output_projection.in_features) for c in analysis.attention})
    transforms = random_transforms(analysis, seed, gates=gates)
    gm, _ = apply(gm, analysis, 16, 16, state=gm.meta[STATE_META_KEY], quantize_head=quantize_head, transforms=transforms, quantize=False)
    return output_differences(before, run_graph(gm, inputs), "quantize_linears(quantize=False)", RTOL)


def _norm_weights(analysis, transforms) -> dict:
    """The norm weight each transformed site folds (None: no fold), read before the pass runs."""
    norms = {}
    for site in analysis.sites:
        transform = transforms.get(site_key(site))
        if transform is not None:
            norms[site_key(site)] = norm_scale_feeding(site.input, analysis.bindings)[1].tensor.detach() if transform.fold_norm else None
    return norms


def _hook_transformed_linears(model, analysis, transforms, norms, is_masked) -> list:
    """Replace each transformed linear's output in the eager model by ``T(x, state) W''ᵀ + b``."""
    handles = []
    for site in analysis.sites:
        transform = transforms.get(site_key(site))
        if transform is None:
            continue
        norm = norms[site_key(site)]
        for lin in site.linears:
            folded = transform.fold_weight(lin.weight_nk(), norm)

            def hook(module, args, output, transform=transform, folded=folded, norm=norm):
                x = args[0] if norm is None else args[0] / norm  # the graph reads the normalised tensor
                y = transform.transform_activation(x, is_masked) @ folded.t()
                return (y if module.bias is None else y + module.bias).to(output.dtype)

            module = model.get_submodule(lin.fqn.rsplit(".", 1)[0])
            handles.append(module.register_forward_hook(hook))
    return handles


def gated_state_problems(cap, ids, seed, apply=quantize_linears, insert=insert_token_state) -> list[str]:
    """With SGAT gates (private columns zeroed) the graph computes the transforms' function for
    each token's state: the eager model with hooked linears is the reference."""
    gm, analysis, _ = cap.fresh()
    inputs = cap.inputs_with(ids)
    gm, _ = insert(gm, analysis.state_source, MASK_ID)
    transforms = random_transforms(analysis, seed, gates="random", share=1.0)
    norms = _norm_weights(analysis, transforms)
    gm, _ = apply(gm, analysis, 16, 16, state=gm.meta[STATE_META_KEY], quantize_head=True, transforms=transforms, quantize=False)
    model = cap.config.build()
    handles = _hook_transformed_linears(model, analysis, transforms, norms, ids == MASK_ID)
    try:
        with torch.no_grad():
            reference = logits_of(model(ids))
    finally:
        for handle in handles:
            handle.remove()
    out = [o for o in run_graph(gm, inputs) if isinstance(o, torch.Tensor) and o.shape == reference.shape]
    if not out:
        return [f"the graph has no output shaped like the logits {tuple(reference.shape)}"]
    return output_differences((reference,), (out[0],), "gated transforms vs the hooked eager model", RTOL)


# ---------------------------------------------------------------------------------------------
# the properties (one capture per example serves all four: a capture costs more than the checks)


@given(
    config=tiny_configs(),
    shape=batch_shapes,
    pattern=mask_patterns,
    seed=st.integers(0, 2**16),
    largest_group=st.sampled_from([None, 1, 4, 8, 32]),
    gates=st.sampled_from(["none", "ones"]),
    quantize_head=st.booleans(),
    tac_first=st.booleans(),
)
def test_passes_keep_the_function_with_quantizers_off(config, shape, pattern, seed, largest_group, gates, quantize_head, tac_first):
    cap, ids = captured(config, shape), make_ids(shape, pattern, seed)
    group_for = (lambda c: None) if largest_group is None else (lambda c: tac_group_size(c, largest_group))
    assert token_state_problems(cap, ids) == []
    assert identity_tac_problems(cap, ids, group_for) == []
    assert float_transform_problems(cap, ids, seed, gates, quantize_head, tac_first) == []
    assert gated_state_problems(cap, ids, seed) == []


# ---------------------------------------------------------------------------------------------
# each check catches a broken pass

SHAPE = (2, 9)


def _ids(pattern="random"):
    ids = make_ids(SHAPE, pattern, seed=5)
    assert (ids == MASK_ID).any() and (ids != MASK_ID).any() if pattern == "random" else True
    return ids


def test_a_token_state_with_the_wrong_mask_id_is_caught():
    def wrong_mask(gm, source, mask_id):
        return insert_token_state(gm, source, mask_id - 1)

    problems = token_state_problems(captured(MUTANT, SHAPE), _ids(), insert=wrong_mask)
    assert any("the state node is not input_ids == 255" in p for p in problems), problems


def test_a_token_state_pass_that_rewrites_masked_tokens_is_caught():
    def rewrites_masks(gm, source, mask_id):
        gm, report = insert_token_state(gm, source, mask_id)
        state = gm.meta[STATE_META_KEY]
        with gm.graph.inserting_after(state):
            cleaned = gm.graph.call_function(torch.where, (state, 0, source))
        source.replace_all_uses_with(cleaned, delete_user_cb=lambda user: user not in (state, cleaned))
        gm.recompile()
        return gm, report

    problems = token_state_problems(captured(MUTANT, SHAPE), _ids(), insert=rewrites_masks)
    assert any("insert_token_state: output" in p for p in problems), problems


def test_a_tac_with_nonzero_d_is_caught():
    def shifted(gm, analysis, params):
        return insert_tac(gm, analysis, {fqn: TacParams(p.M, p.d + 1e-3) for fqn, p in params.items()})

    problems = identity_tac_problems(captured(MUTANT, SHAPE), _ids(), insert=shifted)
    assert any("insert_tac (M = I, d = 0): output" in p for p in problems), problems


def test_a_tac_whose_M_is_not_the_identity_is_caught():
    def scaled(gm, analysis, params):
        return insert_tac(gm, analysis, {fqn: TacParams(p.M * (1 + 2**-10), p.d) for fqn, p in params.items()})

    assert identity_tac_problems(captured(MUTANT, SHAPE), _ids(), insert=scaled)


class _FoldWithoutRotation(SiteTransform):
    """Broken on purpose: the activation is rotated by P, the folded weight is not."""

    def fold_weight(self, w_nk, norm_weight=None):
        return SiteTransform(fold_norm=self.fold_norm, smooth=self.smooth).fold_weight(w_nk, norm_weight)


class _FoldWithoutNorm(SiteTransform):
    """Broken on purpose: the graph reads the normalised tensor, the norm weight is not folded."""

    def fold_weight(self, w_nk, norm_weight=None):
        return SiteTransform(smooth=self.smooth, p1=self.p1, p2=self.p2).fold_weight(w_nk)


def _with_transform_class(cls):
    def apply(gm, analysis, *args, transforms, **kwargs):
        broken = {k: cls(**{f: getattr(t, f) for f in ("fold_norm", *SiteTransform.RECIPE_FIELDS)}) for k, t in transforms.items()}
        return quantize_linears(gm, analysis, *args, transforms=broken, **kwargs)

    return apply


def test_a_folded_weight_that_misses_P_is_caught():
    problems = float_transform_problems(captured(MUTANT, SHAPE), _ids(), 7, "none", True, False, apply=_with_transform_class(_FoldWithoutRotation))
    assert any("quantize_linears(quantize=False): output" in p for p in problems), problems


def test_a_folded_weight_that_misses_the_norm_weight_is_caught():
    problems = float_transform_problems(captured(MUTANT, SHAPE), _ids(), 7, "ones", True, False, apply=_with_transform_class(_FoldWithoutNorm))
    assert any("quantize_linears(quantize=False): output" in p for p in problems), problems


def test_gates_chosen_by_the_wrong_state_are_caught():
    def wrong_mask(gm, source, mask_id):
        return insert_token_state(gm, source, mask_id - 1)

    problems = gated_state_problems(captured(MUTANT, SHAPE), _ids(), 3, insert=wrong_mask)
    assert any("gated transforms vs the hooked eager model" in p for p in problems), problems


def test_swapped_gates_are_caught():
    def swapped(gm, analysis, *args, transforms, **kwargs):
        swap = {k: SiteTransform(t.fold_norm, t.smooth, t.p1, t.p2, t.gate_unmasked, t.gate_masked) for k, t in transforms.items()}
        return quantize_linears(gm, analysis, *args, transforms=swap, **kwargs)

    # all tokens masked: still caught (masked tokens get the unmasked gate)
    assert gated_state_problems(captured(MUTANT, SHAPE), _ids("all"), 3, apply=swapped)
