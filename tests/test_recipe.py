"""Recipe: round trips through the file, model fingerprints, and every way a file or model is refused."""

import json
import os
import struct
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from stq_compiler import recipe as recipe_module
from stq_compiler.recipe import (
    FORMAT_VERSION,
    Recipe,
    RecipeError,
    RecipeMismatchError,
    fingerprint_from_bindings,
    fingerprint_from_model,
    fingerprint_of,
)


class TinyBlock(torch.nn.Module):
    def __init__(self, d=8, hidden=16):
        super().__init__()
        self.q_proj = torch.nn.Linear(d, d, bias=False)
        self.up = torch.nn.Linear(d, hidden)
        self.down = torch.nn.Linear(hidden, d)
        self.register_buffer("scale", torch.ones(d))

    def forward(self, x):
        return self.down(torch.relu(self.up(self.q_proj(x)))) * self.scale


def make_recipe(**overrides):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "q_proj.weight::sgat.P1": torch.randn(4, 4, generator=g),
        "q_proj.weight::sgat.scale": torch.randn(8, generator=g).to(torch.float16),
        "q_proj.weight::gptq.q": torch.randint(-8, 8, (8, 8), generator=g, dtype=torch.int8),
        "up.weight::smooth": torch.randn(8, generator=g).to(torch.bfloat16),
        "up.weight::gate": torch.rand(16, generator=g) > 0.5,
        "down.weight::tac.M": torch.randn(2, 8, 8, generator=g, dtype=torch.float64),
        "down.bias::step": torch.tensor(3, dtype=torch.int64),  # 0-d
        "down.weight::none": torch.zeros(0, 5, dtype=torch.uint8),  # empty
    }
    fields = dict(
        method="starquant",
        w_bits=4,
        a_bits=4,
        mask_token_id=255,
        options={"gptq": True, "tac": True, "sgat": True, "group": 16},
        tensors=tensors,
        fingerprint=fingerprint_from_model(TinyBlock()),
    )
    fields.update(overrides)
    return Recipe(**fields)


def data_offsets(path):
    """{tensor name: (start, end)} absolute byte offsets in a safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    start = 8 + n
    header.pop("__metadata__", None)
    return {k: (start + v["data_offsets"][0], start + v["data_offsets"][1]) for k, v in header.items()}


def rewrite_header(path, edit):
    """Write the file again with its stq_recipe JSON passed through `edit` (tensors unchanged)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    header = json.loads(metadata["stq_recipe"])
    edit(header)
    metadata["stq_recipe"] = json.dumps(header)
    save_file(tensors, str(path), metadata=metadata)


# ---------------------------------------------------------------------------------------------
# round trip


def test_round_trip_is_exact(tmp_path):
    recipe = make_recipe()
    path = recipe.save(tmp_path / "tiny.stq")
    loaded = Recipe.load(path)
    assert loaded == recipe
    assert loaded.digest() == recipe.digest()
    for key, tensor in recipe.tensors.items():
        assert loaded.tensors[key].dtype == tensor.dtype
        assert loaded.tensors[key].shape == tensor.shape
        assert torch.equal(loaded.tensors[key], tensor)
    fields = ("method", "w_bits", "a_bits", "mask_token_id", "options", "fingerprint", "versions", "format_version")
    assert [getattr(loaded, f) for f in fields] == [getattr(recipe, f) for f in fields]
    assert sorted(os.listdir(tmp_path)) == ["tiny.stq"]  # no temp file left behind


def test_saves_views_non_contiguous_and_shared_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    recipe = make_recipe(
        tensors={"a.weight::t": base.t(), "a.weight::row": base[1], "a.weight::all": base, "b.weight::same": base},
        fingerprint=fingerprint_of([("a.weight", (4, 6)), ("b.weight", (4, 6))]),
    )
    loaded = Recipe.load(recipe.save(tmp_path / "views.stq"))
    assert loaded == recipe
    assert torch.equal(loaded.tensors["a.weight::t"], base.t())


def test_save_overwrites_atomically_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r.stq"
    first = make_recipe()
    first.save(path)
    second = make_recipe(method="rtn", options={})
    second.save(path)
    assert Recipe.load(path) == second

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(recipe_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        first.save(path)
    assert Recipe.load(path) == second
    assert sorted(os.listdir(tmp_path)) == ["r.stq"]


def test_versions_are_filled_and_options_stored_as_json():
    recipe = make_recipe(options={"group": (16, 32)})
    assert set(recipe.versions) == {"stq_compiler", "torch", "transformers", "safetensors"}
    assert recipe.versions["torch"] == str(torch.__version__)
    assert recipe.options == {"group": [16, 32]}
    assert make_recipe(versions={"torch": "x"}).versions == {"torch": "x"}


def test_equality_is_bitwise():
    recipe = make_recipe()
    other = make_recipe()
    assert recipe == other
    other.tensors["q_proj.weight::sgat.P1"] = other.tensors["q_proj.weight::sgat.P1"].clone()
    other.tensors["q_proj.weight::sgat.P1"][0, 0] += 1
    assert recipe != other
    retyped = make_recipe()
    retyped.tensors["down.weight::tac.M"] = retyped.tensors["down.weight::tac.M"].float()
    assert recipe != retyped
    assert recipe != make_recipe(mask_token_id=None)
    assert make_recipe(tensors={"a::x": torch.tensor([float("nan")])}) == make_recipe(
        tensors={"a::x": torch.tensor([float("nan")])}
    )


def test_keys_for_parameter_and_summary():
    recipe = make_recipe()
    assert Recipe.key("q_proj.weight", "sgat.P1") == "q_proj.weight::sgat.P1"
    assert Recipe.split_key("x.weight::tac::M") == ("x.weight", "tac::M")
    assert set(recipe.for_parameter("q_proj.weight")) == {"sgat.P1", "sgat.scale", "gptq.q"}
    assert recipe.for_parameter("q_proj") == {}
    assert recipe.parameter_fqns() == ["down.bias", "down.weight", "q_proj.weight", "up.weight"]
    text = recipe.summary()
    assert "starquant W4A4" in text and "8 tensors" in text and "mask token id 255" in text
    assert "method='starquant'" in repr(recipe) and f"nbytes={recipe.nbytes}" in repr(recipe)
    for bad in [("", "x"), ("a::b", "x"), ("a", "")]:
        with pytest.raises(RecipeError):
            Recipe.key(*bad)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("method", "awq", "method 'awq'"),
        ("w_bits", 3, "w_bits=3"),
        ("a_bits", True, "a_bits=True"),
        ("mask_token_id", -1, "mask_token_id"),
        ("options", {"alpha": float("nan")}, "options must be JSON"),
        ("options", {"fn": print}, "options must be JSON"),
        ("tensors", {"no_separator": torch.zeros(1)}, "'no_separator' is not of the form"),
        ("tensors", {"a::x": [1, 2]}, "a::x is a list"),
        ("format_version", 2, "format_version 2"),
    ],
)
def test_refuses_invalid_fields(field, value, message):
    with pytest.raises(RecipeError, match=message):
        make_recipe(**{field: value})


def test_refuses_fingerprint_with_wrong_hash():
    fingerprint = fingerprint_from_model(TinyBlock())
    fingerprint["parameters"]["q_proj.weight"] = [9, 9]
    with pytest.raises(RecipeError, match="does not match its parameter list"):
        make_recipe(fingerprint=fingerprint)


# ---------------------------------------------------------------------------------------------
# fingerprints


def test_fingerprint_of_module():
    fp = fingerprint_from_model(TinyBlock())
    assert fp["parameters"] == {
        "down.bias": [8],
        "down.weight": [8, 16],
        "q_proj.weight": [8, 8],
        "up.bias": [16],
        "up.weight": [16, 8],
    }
    assert list(fp["parameters"]) == sorted(fp["parameters"])  # sorted; buffers left out
    assert fp == fingerprint_from_model(TinyBlock())  # independent of the weights' values
    assert fp == fingerprint_of(reversed([(n, p.shape) for n, p in TinyBlock().named_parameters()]))
    assert fingerprint_from_model(TinyBlock(hidden=32))["sha256"] != fp["sha256"]
    assert fingerprint_from_model(torch.compile(TinyBlock())) == fp  # the compile wrapper's module


def test_fingerprint_refuses_conflicting_duplicates():
    assert fingerprint_of([("a", (2,)), ("a", [2])]) == fingerprint_of([("a", (2,))])
    with pytest.raises(RecipeError, match="listed twice"):
        fingerprint_of([("a", (2,)), ("a", (3,))])
    with pytest.raises(RecipeError, match="non-negative"):
        fingerprint_of([("a", (-1,))])


def test_fingerprint_from_bindings_keeps_parameters_only():
    bindings = {
        0: SimpleNamespace(fqn="w", tensor=torch.zeros(3, 2), is_parameter=True),
        1: SimpleNamespace(fqn="buf", tensor=torch.zeros(3), is_parameter=False),
    }
    assert fingerprint_from_bindings(bindings) == fingerprint_of([("w", (3, 2))])


def test_fingerprint_of_captured_graph_matches_model():
    from tests.conftest import capture_graphs

    from stq_compiler.capture import bind_tensors

    model = TinyBlock().eval()
    [(gm, example_inputs)] = capture_graphs(model, torch.randn(2, 8))
    fp = fingerprint_from_bindings(bind_tensors(gm, example_inputs))
    assert fp == fingerprint_from_model(model)
    make_recipe().check_fits(fp)


# ---------------------------------------------------------------------------------------------
# refused files


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match=r"nope\.stq does not exist"):
        Recipe.load(tmp_path / "nope.stq")
    with pytest.raises(RecipeError, match="is not a file"):
        Recipe.load(tmp_path)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.stq"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1)).tolist()))
    with pytest.raises(RecipeError, match=f"{path}.*not a readable safetensors file"):
        Recipe.load(path)
    path.write_bytes(b"")
    with pytest.raises(RecipeError, match="not a readable safetensors file"):
        Recipe.load(path)


@pytest.mark.parametrize("cut", ["half", "last_bytes"])
def test_truncated_file(tmp_path, cut):
    path = make_recipe().save(tmp_path / "r.stq")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-3])
    with pytest.raises(RecipeError, match="not a readable safetensors file"):
        Recipe.load(path)


# up.weight::gate is bool: a flipped 0x01 byte still reads True, and clone() would even hide it.
@pytest.mark.parametrize("name", ["q_proj.weight::sgat.P1", "up.weight::gate", "down.bias::step"])
def test_flipped_byte_names_the_tensor(tmp_path, name):
    path = make_recipe().save(tmp_path / "r.stq")
    start, end = data_offsets(path)[name]
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RecipeError, match="damaged") as info:
        Recipe.load(path)
    assert name in str(info.value) and str(path) in str(info.value)
    others = set(make_recipe().tensors) - {name}
    assert not any(other in str(info.value) for other in others)


def test_plain_safetensors_is_not_a_recipe(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(RecipeError, match="not a stq recipe"):
        Recipe.load(path)
    save_file({"w": torch.zeros(2)}, str(path))  # no metadata at all
    with pytest.raises(RecipeError, match="not a stq recipe"):
        Recipe.load(path)


def test_unknown_format_version(tmp_path):
    path = make_recipe().save(tmp_path / "r.stq")
    rewrite_header(path, lambda h: h.update(format_version=FORMAT_VERSION + 1))
    message = f"format_version {FORMAT_VERSION + 1} .*reads format_version {FORMAT_VERSION}"
    with pytest.raises(RecipeError, match=message):
        Recipe.load(path)


def test_hash_list_must_match_tensors(tmp_path):
    path = make_recipe().save(tmp_path / "r.stq")
    rewrite_header(path, lambda h: h["tensor_sha256"].pop("up.weight::smooth"))
    with pytest.raises(RecipeError, match=r"missing from its hash list: up\.weight::smooth"):
        Recipe.load(path)
    path = make_recipe().save(tmp_path / "r.stq")
    rewrite_header(path, lambda h: h["tensor_sha256"].update({"ghost.weight::x": "00"}))
    with pytest.raises(RecipeError, match=r"lacks tensor\(s\) its hash list records: ghost\.weight::x"):
        Recipe.load(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h.pop("method"), "missing field"),
        (lambda h: h.update(surprise=1), "unknown field"),
        (lambda h: h.update(w_bits=5), "w_bits=5"),
        (lambda h: h["fingerprint"]["parameters"].update({"x": [1]}), "does not match its parameter list"),
    ],
)
def test_bad_metadata(tmp_path, edit, message):
    path = make_recipe().save(tmp_path / "r.stq")
    rewrite_header(path, edit)
    with pytest.raises(RecipeError, match=message) as info:
        Recipe.load(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# refused models


def test_check_fits_accepts_the_same_model():
    recipe = make_recipe()
    recipe.check_fits(TinyBlock())
    recipe.check_fits(fingerprint_from_model(TinyBlock()))
    recipe.check_fits([(n, p.shape) for n, p in TinyBlock().named_parameters()])
    recipe.check_fits({n: p.shape for n, p in TinyBlock().named_parameters()})


def shapes_of(model, drop=(), change=None, add=None):
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n not in drop}
    shapes.update(change or {})
    shapes.update(add or {})
    return list(shapes.items())


def test_check_fits_missing_parameter():
    with pytest.raises(RecipeMismatchError, match=r"parameter up\.bias \[16\], this model has no such parameter"):
        make_recipe().check_fits(shapes_of(TinyBlock(), drop={"up.bias"}))


def test_check_fits_shape_mismatch():
    message = r"parameter up\.weight has shape \[32, 8\] in this model but \[16, 8\]"
    with pytest.raises(RecipeMismatchError, match=message):
        make_recipe().check_fits(shapes_of(TinyBlock(), change={"up.weight": (32, 8)}))


def test_check_fits_extra_parameter():
    message = r"this model has parameter norm\.weight \[8\], which the recipe's model did not"
    with pytest.raises(RecipeMismatchError, match=message):
        make_recipe().check_fits(shapes_of(TinyBlock(), add={"norm.weight": (8,)}))


def test_check_fits_names_first_mismatch_in_sorted_order():
    other = shapes_of(TinyBlock(), drop={"up.bias"}, change={"down.weight": (8, 32)}, add={"z.weight": (1,)})
    with pytest.raises(RecipeMismatchError) as info:
        make_recipe().check_fits(other)
    message = str(info.value)
    assert "down.weight" in message and "up.bias" not in message and "(and 2 more mismatch(es))" in message


def test_check_fits_subset_for_a_graph_piece():
    piece = [("up.weight", (16, 8)), ("up.bias", (16,))]
    make_recipe().check_fits(piece, subset=True)
    with pytest.raises(RecipeMismatchError, match="up.weight has shape"):
        make_recipe().check_fits([("up.weight", (16, 4))], subset=True)
    with pytest.raises(RecipeMismatchError, match="this model has parameter other.weight"):
        make_recipe().check_fits([("other.weight", (1,))], subset=True)


def test_check_tensor_keys():
    recipe = make_recipe()
    recipe.check_tensor_keys([n for n, _ in TinyBlock().named_parameters()])
    recipe.check_tensor_keys(TinyBlock())
    recipe.tensors["model.up.weight::smooth"] = torch.ones(8)
    message = r"model\.up\.weight::smooth is for parameter model\.up\.weight.*closest parameter: up\.weight"
    with pytest.raises(RecipeMismatchError, match=message):
        recipe.check_tensor_keys(TinyBlock())


def test_check_tensor_keys_after_round_trip(tmp_path):
    recipe = make_recipe()
    recipe.tensors["ghost.weight::x"] = torch.ones(1)
    loaded = Recipe.load(recipe.save(tmp_path / "r.stq"))
    with pytest.raises(RecipeMismatchError, match=r"ghost\.weight::x"):
        loaded.check_tensor_keys(fingerprint_from_model(TinyBlock()))


# ---------------------------------------------------------------------------------------------
# property: any dict of small tensors round-trips exactly

DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool,
]  # fmt: skip


def random_tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=g, dtype=dtype)


tensor_specs = st.tuples(
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
    st.integers(0, 2**31 - 1),
)
keys = st.tuples(
    st.sampled_from(["a.weight", "b.0.weight", "c.bias"]),
    st.from_regex(r"[a-z][a-z0-9_.:]{0,8}", fullmatch=True),  # suffixes may hold "::" themselves
)


@settings(max_examples=25, deadline=None)
@given(
    st.dictionaries(keys, tensor_specs, max_size=6),
    st.sampled_from(["rtn", "smoothquant", "quarot", "starquant"]),
    st.sampled_from([4, 8]),
    st.one_of(st.none(), st.integers(0, 200000)),
)
def test_property_round_trip(specs, method, bits, mask_token_id):
    tensors = {Recipe.key(fqn, suffix): random_tensor(*spec) for (fqn, suffix), spec in specs.items()}
    recipe = Recipe(
        method=method,
        w_bits=bits,
        a_bits=bits,
        mask_token_id=mask_token_id,
        options={"seeded": len(tensors)},
        tensors=tensors,
        fingerprint=fingerprint_of([("a.weight", (4, 4)), ("b.0.weight", (2, 3)), ("c.bias", (4,))]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        loaded = Recipe.load(recipe.save(Path(tmp) / "p.stq"))
    assert loaded == recipe
    assert loaded.digest() == recipe.digest()
    for key, tensor in tensors.items():
        assert loaded.tensors[key].dtype == tensor.dtype and torch.equal(loaded.tensors[key], tensor)
