"""After every pass the graph keeps the invariants of ``stq_compiler.verify``: well formed and
acyclic, no dangling nodes, one token state consumed by every state-conditioned node, shapes that
propagate, each quantized weight folded once into its own buffers.

The passes run as the backend runs them (token state, TAC with random maps, quantize_linears with
random transforms, gates and bit widths), on random small models; ``verify_graph`` must find
nothing after any of them. Then each invariant is broken on purpose by a mutated pass, and the
verifier must name it.
"""

from __future__ import annotations

import random

import torch
import torch.fx as fx
from hypothesis import given, strategies as st

from stq_compiler.calibration.tac import TacParams, tac_group_size
from stq_compiler.passes import register_constant
from stq_compiler.passes.quantize_linears import quantize_linears
from stq_compiler.passes.tac import TAC_OP, insert_tac
from stq_compiler.passes.token_state import STATE_META_KEY, insert_token_state
from stq_compiler.verify import GraphInvariantError, assert_valid, verify_graph
from tests.properties.dllm import MASK_ID, TinyConfig, batch_shapes, captured, random_transforms, tiny_configs

QUANTIZED_LINEAR = torch.ops.stq.quantized_linear.default
QUANTIZER = torch.ops.stq.quantize_per_token.default

# kv_heads == heads: q, k and v weights all [C, C], so a mutant can swap them without a shape error
MUTANT = TinyConfig("dream", layers=1, heads=2, kv_heads=2, head_dim=16, mlp_ratio=2, seed=2)
SHAPE = (2, 7)


def random_tac_params(analysis, seed: int, share: float = 0.8) -> dict[str, TacParams]:
    """Random maps (block size ≤ 4, 8 or 16) for about ``share`` of the attention layers."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    params = {}
    for core in analysis.attention:
        proj = core.output_projection
        if proj is None or rng.random() > share:
            continue
        c = proj.in_features
        g = tac_group_size(c, rng.choice([4, 8, 16]))
        M = torch.eye(g) + 0.3 * torch.randn(c // g, g, g, generator=gen)
        params[proj.fqn] = TacParams(M, 0.2 * torch.randn(c, generator=gen))
    return params


# ---------------------------------------------------------------------------------------------
# the property check


def pass_sequence_problems(
    cap,
    *,
    seed: int = 0,
    bits: tuple[int, int] = (4, 4),
    quantize_head: bool = False,
    gates: str = "random",
    quantize: bool = True,
    tac_share: float = 0.8,
    token_state=insert_token_state,
    tac=insert_tac,
    quantize_pass=quantize_linears,
) -> list[str]:
    """Run the passes on a copy of ``cap``'s graph; the problems ``verify_graph`` finds after the
    first pass that leaves any (the later passes would run on a broken graph)."""
    gm, analysis, inputs = cap.fresh()
    problems = [f"captured: {p}" for p in verify_graph(gm, inputs)]
    if problems:
        return problems
    gm, _ = token_state(gm, analysis.state_source, MASK_ID)
    problems = [f"after insert_token_state: {p}" for p in verify_graph(gm, inputs, mask_token_id=MASK_ID)]
    if problems:
        return problems
    gm, _ = tac(gm, analysis, random_tac_params(analysis, seed, tac_share))
    problems = [f"after insert_tac: {p}" for p in verify_graph(gm, inputs, mask_token_id=MASK_ID)]
    if problems:
        return problems
    transforms = random_transforms(analysis, seed, gates=gates)
    gm, _ = quantize_pass(
        gm, analysis, *bits, state=gm.meta.get(STATE_META_KEY), quantize_head=quantize_head, transforms=transforms, quantize=quantize
    )
    return [f"after quantize_linears: {p}" for p in verify_graph(gm, inputs, mask_token_id=MASK_ID)]


@given(
    config=tiny_configs(),
    shape=batch_shapes,
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([(4, 4), (8, 8), (4, 8), (8, 4)]),
    quantize_head=st.booleans(),
    gates=st.sampled_from(["none", "ones", "random"]),
    quantize=st.booleans(),
)
def test_every_pass_leaves_a_valid_graph(config, shape, seed, bits, quantize_head, gates, quantize):
    problems = pass_sequence_problems(
        captured(config, shape), seed=seed, bits=bits, quantize_head=quantize_head, gates=gates, quantize=quantize
    )
    assert problems == []


def test_an_unread_state_node_survives_quantize_linears():
    """Nothing reads the state here (quantizers off, no gates); the node must stay for later passes."""
    assert _problems(gates="none", quantize=False) == []


def test_assert_valid_lists_every_problem():
    gm, analysis, inputs = captured(MUTANT, SHAPE).fresh()
    assert_valid(gm, inputs)
    gm, _ = insert_token_state(gm, analysis.state_source, MASK_ID)
    with gm.graph.inserting_after(gm.meta[STATE_META_KEY]):
        gm.graph.call_function(torch.eq, (analysis.state_source, MASK_ID))
    try:
        assert_valid(gm, inputs, mask_token_id=MASK_ID - 1)
    except GraphInvariantError as error:
        assert len(error.problems) == 3 and str(error).startswith("3 graph invariant(s) broken")
    else:
        raise AssertionError("assert_valid accepted a graph with two state nodes")


def test_observers_and_side_effects_are_not_dangling_and_meta_is_untouched():
    class ActivationObserver(torch.nn.Module):
        def forward(self, x):
            return None

    gm, analysis, inputs = captured(MUTANT, SHAPE).fresh()
    gm.add_submodule("stq_observer_0", ActivationObserver())
    site_input = analysis.sites[0].input
    with gm.graph.inserting_after(site_input):
        gm.graph.call_module("stq_observer_0", (site_input,))
        gm.graph.call_function(torch._C._log_api_usage_once, ("stq.test",))
    gm.recompile()
    before = {n.name: dict(n.meta) for n in gm.graph.nodes}
    assert verify_graph(gm, inputs) == []
    assert {n.name: dict(n.meta) for n in gm.graph.nodes} == before


# ---------------------------------------------------------------------------------------------
# each invariant, broken by a mutated pass, is caught


def _problems(**mutants) -> list[str]:
    return pass_sequence_problems(captured(MUTANT, SHAPE), seed=1, tac_share=1.0, **mutants)


def _has(problems: list[str], *fragments: str) -> bool:
    return any(all(f in p for f in fragments) for p in problems)


def _first(gm, target) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target is target)


def test_a_cycle_is_caught():
    def cyclic(gm, *args, **kwargs):
        gm, report = quantize_linears(gm, *args, **kwargs)
        quantizer = _first(gm, QUANTIZER)
        linear = next(u for g in quantizer.users for u in g.users if u.target is QUANTIZED_LINEAR)
        quantizer.update_arg(0, linear)  # the quantizer now reads what it feeds
        return gm, report

    problems = _problems(quantize_pass=cyclic)
    assert _has(problems, "after quantize_linears: cycle:") and _has(problems, "after quantize_linears: lint:"), problems


def test_a_node_used_before_its_definition_is_caught():
    def misplaced(gm, analysis, params):
        gm, report = insert_tac(gm, analysis, params)
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        for tac in [n for n in gm.graph.nodes if n.target is TAC_OP]:
            first.prepend(tac)  # before its input is computed
        return gm, report

    problems = _problems(tac=misplaced)
    assert _has(problems, "after insert_tac: lint:", "before it has been defined"), problems
    assert not _has(problems, "cycle")


def test_a_dangling_node_is_caught():
    def leaves_a_constant(gm, *args, **kwargs):
        gm, report = quantize_linears(gm, *args, **kwargs)
        register_constant(gm, "stq_unused", torch.zeros(3))
        with gm.graph.inserting_before(_first(gm, QUANTIZED_LINEAR)):
            gm.graph.get_attr("stq_unused")
        gm.recompile()
        return gm, report

    problems = _problems(quantize_pass=leaves_a_constant)
    assert problems == ["after quantize_linears: dangling: stq_unused (get_attr stq_unused) has no users"], problems


def test_a_second_state_node_is_caught():
    def twice(gm, source, mask_id):
        gm, report = insert_token_state(gm, source, mask_id)
        with gm.graph.inserting_after(gm.meta[STATE_META_KEY]):
            gm.graph.call_function(torch.eq, (source, mask_id))
        return gm, report

    problems = _problems(token_state=twice)
    assert _has(problems, "after insert_token_state: token state: 2 eq(input_ids, mask) nodes"), problems
    assert _has(problems, "after insert_token_state: dangling: eq")


def test_a_state_with_the_wrong_mask_id_is_caught():
    def wrong_mask(gm, source, mask_id):
        return insert_token_state(gm, source, mask_id + 1)

    problems = _problems(token_state=wrong_mask)
    assert _has(problems, "after insert_token_state: token state:", "compares with token id 256, not the mask id 255"), problems


def _with_own_state(gm, analysis, *args, state, **kwargs):
    """Broken on purpose: the quantize pass computes its own eq(input_ids, mask) for its consumers."""
    with gm.graph.inserting_after(analysis.state_source):
        own = gm.graph.call_function(torch.eq, (analysis.state_source, MASK_ID))
    return quantize_linears(gm, analysis, *args, state=own, **kwargs)


def test_quantizers_reading_another_state_node_are_caught():
    problems = _problems(quantize_pass=_with_own_state, gates="random", quantize=True)
    assert _has(problems, "after quantize_linears: token state:", "as its is_masked, not the state node is_masked"), problems


def test_gates_selected_by_another_state_node_are_caught():
    problems = _problems(quantize_pass=_with_own_state, gates="random", quantize=False)  # float gates: torch.where
    assert _has(problems, "after quantize_linears: token state:", "as its condition, not the state node is_masked"), problems


def test_a_shape_that_does_not_propagate_is_caught():
    def half_M(gm, analysis, params):
        gm, report = insert_tac(gm, analysis, params)
        tac = _first(gm, TAC_OP)
        m = getattr(gm, tac.args[1].target)
        setattr(gm, tac.args[1].target, m[: m.shape[0] // 2].clone())  # blocks for half the channels
        return gm, report

    problems = _problems(tac=half_M)
    assert _has(problems, "after insert_tac: shapes: propagation fails at tac_block_affine"), problems


def test_a_dtype_that_differs_from_the_capture_is_caught():
    def bfloat16_out(gm, *args, **kwargs):
        gm, report = quantize_linears(gm, *args, **kwargs)
        _first(gm, QUANTIZED_LINEAR).update_arg(7, torch.bfloat16)  # out_dtype
        return gm, report

    problems = _problems(quantize_pass=bfloat16_out)
    assert _has(problems, "after quantize_linears: shapes:", "torch.float32 when captured but propagates as", "torch.bfloat16"), problems


def test_a_linear_reading_another_linears_weight_is_caught():
    def borrows(gm, *args, **kwargs):
        gm, report = quantize_linears(gm, *args, **kwargs)
        linears = {n.meta["stq_linear"]["fqn"].split(".")[-2]: n for n in gm.graph.nodes if n.target is QUANTIZED_LINEAR}
        with gm.graph.inserting_before(linears["k_proj"]):
            v_codes = gm.graph.get_attr(linears["v_proj"].args[3].target)
        linears["k_proj"].update_arg(3, v_codes)  # k reads v's codes
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm, report

    problems = _problems(quantize_pass=borrows)
    assert _has(problems, "after quantize_linears: quantized weight:", "k_proj.weight) reads codes buffer", "v_proj", "belongs to another weight"), problems
    assert _has(problems, "is read by 2 quantized linears")
    assert _has(problems, "the weight sums are not the row sums of its codes")


def test_a_weight_quantized_twice_is_caught():
    def q_for_k(gm, analysis, *args, **kwargs):
        # the k projection gets the q projection's weight: q's weight quantized for both
        linears = {lin.fqn.split(".")[-2]: lin for lin in analysis.linears}
        linears["k_proj"].weight = linears["q_proj"].weight
        return quantize_linears(gm, analysis, *args, **kwargs)

    problems = _problems(quantize_pass=q_for_k)
    assert _has(problems, "after quantize_linears: quantized weight:", "q_proj.weight is quantized by 2 quantized linears, not once"), problems
