"""The passes are deterministic, and the backend's cache key follows the options.

* Same graph in, same graph out: two captures of the same model, rewritten by the same passes with
  the same inputs (seeded transforms and TAC maps), give the same code, the same buffers (names,
  dtypes, shapes, bytes) and the same per-node quantization metadata.
* ``BackendOptions.cache_key()``: equal options (equal recipes, however made) give equal keys; a
  recipe that differs in a tensor's bytes, bits, mask id, method or options, or any other option
  that changes the compiled graph, gives a different key.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import tempfile
import time
from pathlib import Path

import torch
from hypothesis import given, strategies as st

import stq_compiler.passes.tac as tac_module
from stq_compiler.options import BackendOptions
from stq_compiler.passes.quantize_linears import quantize_linears
from stq_compiler.passes.tac import insert_tac
from stq_compiler.passes.token_state import STATE_META_KEY, insert_token_state
from stq_compiler.recipe import Recipe, fingerprint_of, tensor_sha256
from tests.conftest import examples
from tests.properties.dllm import MASK_ID, TinyConfig, batch_shapes, capture_fresh, random_transforms, tiny_configs
from tests.properties.test_graph_invariants import random_tac_params

MUTANT = TinyConfig("qwen2", layers=1, heads=2, kv_heads=1, head_dim=8, mlp_ratio=2, seed=3)


# ---------------------------------------------------------------------------------------------
# determinism


def rewrite(config, shape, *, seed, bits, gates, quantize_head, tac=insert_tac, quantize=quantize_linears):
    """Capture ``config`` anew and run the passes with inputs drawn from ``seed``."""
    cap = capture_fresh(config, shape)
    gm, analysis, _ = cap.fresh()
    gm, _ = insert_token_state(gm, analysis.state_source, MASK_ID)
    gm, _ = tac(gm, analysis, random_tac_params(analysis, seed))
    transforms = random_transforms(analysis, seed, gates=gates)
    gm, _ = quantize(gm, analysis, *bits, state=gm.meta[STATE_META_KEY], quantize_head=quantize_head, transforms=transforms)
    return gm


def graph_fingerprint(gm) -> dict:
    return {
        "code": gm.code,
        "buffers": {name: (str(b.dtype), tuple(b.shape), tensor_sha256(b)) for name, b in gm.named_buffers()},
        "meta": [(n.name, n.meta.get("stq_linear"), n.meta.get("stq_tac")) for n in gm.graph.nodes],
        "state": gm.meta[STATE_META_KEY].name if gm.meta.get(STATE_META_KEY) is not None else None,
    }


def determinism_problems(build) -> list[str]:
    """Build the rewritten graph twice; what differs between the two."""
    first, second = graph_fingerprint(build()), graph_fingerprint(build())
    problems = []
    if first["code"] != second["code"]:
        a, b = first["code"].splitlines(), second["code"].splitlines()
        line = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        problems.append(f"code differs from line {line}: {a[line].strip() if line < len(a) else '<end>'!r} vs {b[line].strip() if line < len(b) else '<end>'!r}")
    names_a, names_b = set(first["buffers"]), set(second["buffers"])
    if names_a != names_b:
        problems.append(f"buffer names differ: {sorted(names_a ^ names_b)[:4]}")
    changed = sorted(n for n in names_a & names_b if first["buffers"][n] != second["buffers"][n])
    if changed:
        problems.append(f"{len(changed)} buffers differ in dtype, shape or bytes, e.g. {changed[0]}")
    if first["meta"] != second["meta"] or first["state"] != second["state"]:
        problems.append("node metadata differs")
    return problems


@given(
    config=tiny_configs(),
    shape=batch_shapes,
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([(4, 4), (8, 8), (4, 8)]),
    gates=st.sampled_from(["none", "ones", "random"]),
    quantize_head=st.booleans(),
)
def test_the_passes_are_deterministic(config, shape, seed, bits, gates, quantize_head):
    problems = determinism_problems(lambda: rewrite(config, shape, seed=seed, bits=bits, gates=gates, quantize_head=quantize_head))
    assert problems == []


def _mutant_problems(**passes) -> list[str]:
    return determinism_problems(lambda: rewrite(MUTANT, (1, 5), seed=4, bits=(4, 4), gates="random", quantize_head=False, **passes))


def test_a_pass_with_an_unseeded_random_rotation_is_caught():
    def unseeded(gm, analysis, *args, transforms, **kwargs):
        gen = torch.Generator().manual_seed(time.perf_counter_ns())  # seeded from the clock
        for t in transforms.values():
            if t.p1 is not None:
                t.p1 = torch.linalg.qr(torch.randn(t.p1.shape, dtype=torch.float64, generator=gen))[0]
        return quantize_linears(gm, analysis, *args, transforms=transforms, **kwargs)

    problems = _mutant_problems(quantize=unseeded)
    assert any("buffers differ in dtype, shape or bytes" in p for p in problems), problems


def test_a_pass_naming_buffers_with_a_process_counter_is_caught(monkeypatch):
    counter = itertools.count()
    real = tac_module.buffer_name
    monkeypatch.setattr(tac_module, "buffer_name", lambda fqn, what: f"{real(fqn, what)}_{next(counter)}")
    problems = _mutant_problems()
    assert any(p.startswith("code differs") for p in problems) and any(p.startswith("buffer names differ") for p in problems), problems


# ---------------------------------------------------------------------------------------------
# the cache key


@st.composite
def recipes(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n_params = draw(st.integers(1, 3))
    shapes = {f"blocks.{i}.proj.weight": [draw(st.integers(1, 6)), draw(st.integers(1, 6))] for i in range(n_params)}
    tensors = {}
    for fqn, (n, k) in shapes.items():
        for what in draw(st.lists(st.sampled_from(["site.smooth", "w.q", "tac.d"]), min_size=1, max_size=3, unique=True)):
            if what == "w.q":
                tensors[Recipe.key(fqn, what)] = torch.randint(-7, 8, (n, k), generator=gen, dtype=torch.int8)
            else:
                tensors[Recipe.key(fqn, what)] = torch.randn(k, generator=gen)
    return Recipe(
        method=draw(st.sampled_from(["rtn", "smoothquant", "quarot", "starquant"])),
        w_bits=draw(st.sampled_from([4, 8])),
        a_bits=draw(st.sampled_from([4, 8])),
        mask_token_id=draw(st.sampled_from([None, 255, 126336])),
        options={"gptq": draw(st.booleans())},
        tensors=tensors,
        fingerprint=fingerprint_of(shapes.items()),
    )


def recipe_variants(recipe: Recipe) -> dict[str, Recipe]:
    """Recipes that differ from ``recipe`` in one thing each."""
    def changed(**fields) -> Recipe:
        base = dict(
            method=recipe.method, w_bits=recipe.w_bits, a_bits=recipe.a_bits, mask_token_id=recipe.mask_token_id,
            options=copy.deepcopy(recipe.options), tensors={k: t.clone() for k, t in recipe.tensors.items()},
            fingerprint=recipe.fingerprint,
        )
        return Recipe(**{**base, **fields})

    key = sorted(recipe.tensors)[0]
    bumped = recipe.tensors[key].clone()
    flat = bumped.view(-1)
    flat[0] = flat[0] + 1 if not flat.is_floating_point() or flat[0] == 0 else torch.nextafter(flat[0], flat[0] * 2)
    return {
        "one tensor value (one ulp or one code)": changed(tensors={**recipe.tensors, key: bumped}),
        "w_bits": changed(w_bits=12 - recipe.w_bits),
        "a_bits": changed(a_bits=12 - recipe.a_bits),
        "mask id": changed(mask_token_id=1 if recipe.mask_token_id is None else recipe.mask_token_id + 1),
        "method": changed(method="rtn" if recipe.method != "rtn" else "quarot"),
        "method options": changed(options={**recipe.options, "gptq": not recipe.options["gptq"]}),
        "a tensor more": changed(tensors={**recipe.tensors, Recipe.key(key.split("::")[0], "extra"): torch.zeros(1)}),
    }


def cache_key_problems(recipe: Recipe, key=BackendOptions.cache_key) -> list[str]:
    """Equal options must share a key, options differing in one thing must not."""
    problems = []
    base = BackendOptions.from_dict({"recipe": recipe})
    same = {
        "the same options": base,
        "options from an equal recipe": BackendOptions.from_dict({"recipe": copy.deepcopy(recipe)}),
        "another debug_dir": BackendOptions.from_dict({"recipe": recipe, "debug_dir": "/tmp/elsewhere"}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        same["the recipe saved and loaded"] = BackendOptions.from_dict({"recipe": str(recipe.save(Path(tmp) / "r.stq"))})
    reference = key(base)
    problems += [f"{what} give another key" for what, opts in same.items() if key(opts) != reference]
    different = {f"a recipe differing in {what}": BackendOptions.from_dict({"recipe": r}) for what, r in recipe_variants(recipe).items()}
    different.update({
        "no recipe": BackendOptions(w_bits=recipe.w_bits, a_bits=recipe.a_bits, mask_token_id=recipe.mask_token_id),
        "quantize_head": BackendOptions.from_dict({"recipe": recipe, "quantize_head": True}),
        "quantize_embedding": BackendOptions.from_dict({"recipe": recipe, "quantize_embedding": True}),
        "token_state": BackendOptions.from_dict({"recipe": recipe, "token_state": "off"}),
        "inductor": BackendOptions.from_dict({"recipe": recipe, "inductor": False}),
        "inductor_config": BackendOptions.from_dict({"recipe": recipe, "inductor_config": {"max_autotune": True}}),
    })
    keys = {what: key(opts) for what, opts in different.items()}
    problems += [f"{what} gives the same key" for what, k in keys.items() if k == reference]
    for (a, ka), (b, kb) in itertools.combinations(keys.items(), 2):
        if ka == kb:
            problems.append(f"{a} and {b} give the same key")
    return problems


@examples(5)
@given(recipe=recipes())
def test_the_cache_key_follows_the_options(recipe):
    assert cache_key_problems(recipe) == []


def test_the_cache_key_is_a_sha256_hex_digest():
    key = BackendOptions().cache_key()
    assert len(key) == 64 and int(key, 16) >= 0 and key == BackendOptions.from_dict({}).cache_key()


RECIPE = Recipe(
    method="starquant", w_bits=4, a_bits=4, mask_token_id=255, options={"gptq": False},
    tensors={"a.weight::site.smooth": torch.rand(8) + 0.5, "a.weight::w.q": torch.randint(-7, 8, (4, 8), dtype=torch.int8)},
    fingerprint=fingerprint_of([("a.weight", [4, 8])]),
)


def test_a_key_that_sees_the_recipe_only_through_its_repr_is_caught():
    def repr_key(opts):
        return hashlib.sha256(repr(opts).encode()).hexdigest()

    problems = cache_key_problems(RECIPE, key=repr_key)
    assert any("one tensor value" in p and "gives the same key" in p for p in problems), problems


def test_a_key_that_hashes_the_recipe_objects_identity_is_caught():
    def identity_key(opts):
        return hashlib.sha256(f"{id(opts.recipe)}{opts.w_bits}{opts.quantize_head}".encode()).hexdigest()

    problems = cache_key_problems(RECIPE, key=identity_key)
    assert "options from an equal recipe give another key" in problems, problems
