"""calibrate() end to end on tiny models: recipes per method, their invariants, their application."""

import pytest
import torch

from stq_compiler.backend import StarQuant
from stq_compiler.calibration.calibrate import CalibrationError, calibrate
from stq_compiler.calibration.sgat import private_count
from stq_compiler.passes.quantize_linears import quantize_linears
from stq_compiler.analysis import analyze
from stq_compiler.pipeline import plan_from_recipe
from stq_compiler.recipe import Recipe, RecipeError, RecipeMismatchError
from tests.conftest import capture_graphs, logits_of, tiny_model

SMALL = dict(epochs=2, trajectory_prompts=1, trajectory_steps=4, progress=False)


@pytest.fixture(scope="module")
def llada():
    return tiny_model("llada", seed=3)


@pytest.fixture(scope="module")
def calib_ids():
    return torch.randint(0, 255, (8, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def starquant_recipe(llada, calib_ids):
    # gates kept on every site (sgat_select would drop them where they do not pay): the tests below check their machinery
    return calibrate(llada, calib_ids, "starquant", 4, 4, sgat_select=False, **SMALL)


def _run(model, recipe, ids, **options):
    torch._dynamo.reset()
    with torch.no_grad():
        return logits_of(torch.compile(model, backend=StarQuant(recipe=recipe, inductor=False, **options))(ids))


def test_sgat_transforms_are_orthogonal_with_private_columns(starquant_recipe, llada):
    sites = {key.split("::")[0] for key in starquant_recipe.tensors if "::site." in key}
    assert len(sites) == 8  # q/k/v, o, gate/up, down per layer, 2 layers
    for site in sites:
        t = starquant_recipe.for_parameter(site)
        p = torch.kron(t["site.p1"].double(), t["site.p2"].double())
        assert torch.allclose(p @ p.t(), torch.eye(p.shape[0], dtype=torch.float64), atol=1e-5)
        d = p.shape[0]
        off_m, off_u = t["site.gate_masked"] == 0, t["site.gate_unmasked"] == 0
        assert off_m.sum() == off_u.sum() == private_count(d) == max(1, round(d / 32))
        assert not (off_m & off_u).any()  # the two private groups are disjoint
        assert set(t["site.gate_masked"].unique().tolist()) <= {0.0, 1.0}
    tac = [key for key in starquant_recipe.tensors if key.endswith("::tac.M")]
    assert len(tac) == 2 and all(".attn_out." in key for key in tac)


def test_round_trip_through_a_file_gives_identical_outputs(starquant_recipe, llada, tmp_path):
    path = starquant_recipe.save(tmp_path / "tiny.stq")
    loaded = Recipe.load(path)
    assert loaded == starquant_recipe
    ids = torch.randint(0, 255, (2, 16))
    ids[:, 8:] = 255
    torch.testing.assert_close(_run(llada, str(path), ids), _run(llada, starquant_recipe, ids), rtol=0, atol=0)


def test_recipe_application_inserts_transforms_gates_and_tac(starquant_recipe, llada):
    backend = StarQuant(recipe=starquant_recipe, inductor=False)
    ids = torch.randint(0, 255, (1, 16))
    with torch.no_grad():
        torch.compile(llada, backend=backend)(ids)
    (result,) = backend.results
    targets = [str(n.target) for n in result.gm.graph.nodes if n.op == "call_function"]
    assert targets.count("stq.kron_transform.default") == 8
    assert targets.count("stq.tac_block_affine.default") == 2
    state = [n for n in result.gm.graph.nodes if n.name == "is_masked"]
    quantizers = [n for n in result.gm.graph.nodes if str(n.target) == "stq.quantize_per_token.default"]
    assert len(quantizers) == 8 and all(q.kwargs["is_masked"] is state[0] and "gate_masked" in q.kwargs for q in quantizers)


@pytest.mark.parametrize("method,options", [("quarot", {}), ("smoothquant", {}), ("starquant", {"sgat": False})])
def test_method_transforms_are_exact_with_quantizers_off(method, options, llada, calib_ids):
    recipe = calibrate(llada, calib_ids, method, 4, 4, **{**SMALL, **options})
    ids = torch.randint(0, 255, (2, 16))
    ids[0, :] = 255
    (gm, inputs), = capture_graphs(llada, ids)
    analysis = analyze(gm, inputs)
    plan = plan_from_recipe(recipe, analysis, quantize_head=False)
    assert plan.transforms and not plan.needs_state
    gm, report = quantize_linears(gm, analysis, 4, 4, None, False, plan.transforms, quantize=False)
    assert report.details["sites_transformed"] == 8
    with torch.no_grad():
        ref = logits_of(llada(ids))
        out = next(o for o in gm(*inputs) if o.shape == ref.shape)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_gptq_recipe_carries_quantized_weights(llada, calib_ids):
    recipe = calibrate(llada, calib_ids, "rtn", 4, 4, gptq=True, **SMALL)
    codes = {k: v for k, v in recipe.tensors.items() if k.endswith("::w.q")}
    assert len(codes) == 14 and all(v.dtype == torch.int8 and v.abs().max() <= 7 for v in codes.values())
    out = _run(llada, recipe, torch.randint(0, 255, (1, 16)))
    assert torch.isfinite(out).all()


def test_mismatched_and_contradicted_recipes_are_refused(starquant_recipe, tmp_path):
    other = tiny_model("llada", d_model=32, n_heads=2, n_kv_heads=2, mlp_hidden_size=64)
    ids = torch.randint(0, 255, (1, 8))
    with pytest.raises(Exception, match="shape") as info:
        _run(other, starquant_recipe, ids)
    assert isinstance(getattr(info.value, "inner_exception", info.value), RecipeMismatchError)
    with pytest.raises(ValueError, match="contradicts the recipe"):
        StarQuant(recipe=starquant_recipe, w_bits=8)
    # calibrated without the head: asking for a quantized head is refused, not silently dropped
    assert starquant_recipe.options["quantize_head"] is False
    with pytest.raises(ValueError, match="quantize_head=True contradicts the recipe"):
        StarQuant(recipe=starquant_recipe, quantize_head=True)
    assert StarQuant(recipe=starquant_recipe, quantize_head=False).options.quantize_head is False
    path = starquant_recipe.save(tmp_path / "r.stq")
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(RecipeError, match="r.stq"):
        StarQuant(recipe=str(path))


def test_calibration_input_errors(llada, calib_ids):
    with pytest.raises(CalibrationError, match="unknown method"):
        calibrate(llada, calib_ids, "awq")
    with pytest.raises(CalibrationError, match="unknown option"):
        calibrate(llada, calib_ids, "rtn", epoch=3)
    with pytest.raises(CalibrationError, match="w_bits=3"):
        calibrate(llada, calib_ids, "rtn", 3, 4)
    with pytest.raises(CalibrationError, match="tokenizer"):
        calibrate(llada, ["some text"], "rtn")
    no_mask = tiny_model("llada")
    no_mask.config.mask_token_id = None
    with pytest.raises(CalibrationError, match="mask token id"):
        calibrate(no_mask, calib_ids, "rtn")


def test_tac_select_keeps_the_fit_or_the_identity_per_block(starquant_recipe, llada, calib_ids):
    """Same seed, so the same SGAT fit and TAC statistics: each TAC block holds either the default
    recipe's fitted map or the identity, as ``tac_kept`` records."""
    selected = calibrate(llada, calib_ids, "starquant", 4, 4, sgat_select=False, tac_select=True, **SMALL)
    assert selected.options["tac_select"] and selected.options["tac_kept"]
    for fqn, kept in selected.options["tac_kept"].items():
        m, d = selected.tensors[Recipe.key(fqn, "tac.M")], selected.tensors[Recipe.key(fqn, "tac.d")].reshape(len(kept), -1)
        m_fit, d_fit = starquant_recipe.tensors[Recipe.key(fqn, "tac.M")], starquant_recipe.tensors[Recipe.key(fqn, "tac.d")].reshape(len(kept), -1)
        for b, keep in enumerate(kept):
            expected = (m_fit[b], d_fit[b]) if keep else (torch.eye(m.shape[-1]), torch.zeros(d.shape[-1]))
            torch.testing.assert_close((m[b], d[b]), expected, rtol=0, atol=0)
