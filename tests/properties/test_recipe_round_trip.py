"""A recipe saved and loaded compiles to the same model: calibrate a random tiny DLLM (QuaRot,
RTN with GPTQ weights, or STaR-Quant with SGAT and TAC, one epoch), save the recipe, load it, and
hand the model's captured graph to the backend (``StarQuant(recipe=..., inductor=False)``) once with
the recipe in memory and once with the loaded one: the outputs must be identical, bit for bit, and
the loaded recipe's digest the same. (The backend is called on the captured graph directly, as
Dynamo calls it: one capture serves both compiles.)
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from hypothesis import given, strategies as st

import stq_compiler.recipe as recipe_module
from stq_compiler.backend import StarQuant
from stq_compiler.calibration.calibrate import calibrate
from stq_compiler.recipe import Recipe
from tests.properties.dllm import MASK_ID, TinyConfig, batch_shapes, captured, make_ids, mask_patterns, run_graph, tiny_configs

METHODS = {
    "quarot": dict(method="quarot"),
    "rtn+gptq": dict(method="rtn", gptq=True),
    "starquant": dict(method="starquant", epochs=1),
}
CHEAP = dict(progress=False, trajectory_prompts=1, trajectory_steps=2)
MUTANT = TinyConfig("llada", layers=1, heads=2, kv_heads=2, head_dim=16, mlp_ratio=2, seed=1)
SHAPE = (2, 9)


def calibrated(model, method: str, seed: int) -> Recipe:
    ids = torch.randint(0, MASK_ID, (4, 12), generator=torch.Generator().manual_seed(seed))
    options = dict(METHODS[method])
    return calibrate(model, ids, options.pop("method"), 4, 4, seed=seed, **CHEAP, **options)


def backend_outputs(cap, recipe, ids) -> tuple:
    inputs = cap.inputs_with(ids)
    compiled = StarQuant(recipe=recipe, inductor=False)(copy.deepcopy(cap.gm), inputs)
    return run_graph(compiled, inputs)


def round_trip_problems(cap, recipe: Recipe, ids, save=Recipe.save, load=Recipe.load) -> list[str]:
    """Save, load, compile both; what differs."""
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load(save(recipe, Path(tmp) / "recipe.stq"))
    problems = []
    if loaded.digest() != recipe.digest():
        problems.append("the loaded recipe's digest differs")
    for i, (ours, theirs) in enumerate(zip(backend_outputs(cap, recipe, ids), backend_outputs(cap, loaded, ids))):
        if not torch.equal(ours, theirs):
            problems.append(f"outputs differ after the round trip: output {i}, max |diff| {(ours - theirs).abs().max().item():.3g}")
    return problems


@given(
    config=tiny_configs(),
    method=st.sampled_from(sorted(METHODS)),
    shape=batch_shapes,
    pattern=mask_patterns,
    seed=st.integers(0, 2**16),
)
def test_a_saved_recipe_compiles_to_the_same_model(config, method, shape, pattern, seed):
    cap = captured(config, shape)
    recipe = calibrated(cap.model, method, seed)
    assert round_trip_problems(cap, recipe, make_ids(shape, pattern, seed)) == []


def test_a_lossy_save_is_caught(monkeypatch):
    real = recipe_module._for_file

    def bfloat16_on_disk(tensors):  # floats stored in bfloat16 and read back as float32
        out = real(tensors)
        return {k: t.to(torch.bfloat16).to(t.dtype) if t.is_floating_point() else t for k, t in out.items()}

    cap = captured(MUTANT, SHAPE)
    recipe = calibrated(cap.model, "quarot", seed=0)
    monkeypatch.setattr(recipe_module, "_for_file", bfloat16_on_disk)
    problems = round_trip_problems(cap, recipe, make_ids(SHAPE, "random", 0))
    assert any(p.startswith("outputs differ after the round trip") for p in problems), problems


def test_a_load_that_drops_the_gptq_weights_is_caught():
    def forgetful(path):
        loaded = Recipe.load(path)
        loaded.tensors = {k: t for k, t in loaded.tensors.items() if not k.endswith(("::w.q", "::w.scale"))}
        return loaded

    cap = captured(MUTANT, SHAPE)
    recipe = calibrated(cap.model, "rtn+gptq", seed=0)
    problems = round_trip_problems(cap, recipe, make_ids(SHAPE, "suffix", 0), load=forgetful)
    assert any(p.startswith("outputs differ after the round trip") for p in problems), problems
