"""Local safetensors checkpoints: round trips, shards, official-style configs, and refusals."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from stq_compiler.models import (
    CheckpointError,
    LLaDAModelLM,
    build,
    build_tiny,
    detect_architecture,
    load,
    save,
    tiny_llada_config,
)

ARCHS = ["llada", "dream", "llama", "qwen2"]
IDS = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def saved(tmp_path: Path, arch: str = "llada", **overrides) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_tiny(arch, **overrides)
    return model, save(model, tmp_path / arch)


def rewrite_weights(path: Path, edit) -> None:
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, str(path / "model.safetensors"))


def shard(path: Path, names_in_first: int) -> None:
    """Replace model.safetensors by two shards and an index, the Hugging Face layout."""
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[:names_in_first],
             "model-00002-of-00002.safetensors": names[names_in_first:]}
    for file, part in parts.items():
        save_file({n: state[n] for n in part}, str(path / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {n: f for f, part in parts.items() for n in part}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_gives_identical_logits(tmp_path, arch):
    model, path = saved(tmp_path, arch)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    loaded = load(path)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(logits(loaded), logits(model))
    for key in ("mask_token_id", "shift_logits", "vocab_size"):
        assert getattr(loaded.config, key) == getattr(model.config, key)


def test_loaded_transformers_models_stay_bidirectional(tmp_path):
    for arch in ("dream", "llama"):
        _, path = saved(tmp_path, arch)
        loaded = load(path)
        assert loaded.config.is_causal is False and loaded.config.use_cache is False
        changed = IDS.clone()
        changed[:, 7] += 1
        assert not torch.equal(logits(loaded)[:, 1], logits(loaded, changed)[:, 1])


def test_detected_architectures(tmp_path):
    for arch in ARCHS:
        _, path = saved(tmp_path, arch)
        assert detect_architecture(json.loads((path / "config.json").read_text())) == arch


def test_tied_embeddings_are_saved_once_and_tied_on_load(tmp_path):
    model, path = saved(tmp_path, "llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    loaded = load(path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def test_llada_weight_tying_round_trip(tmp_path):
    model, path = saved(tmp_path, "llada", weight_tying=True)
    assert "model.transformer.ff_out.weight" not in load_file(path / "model.safetensors")
    assert torch.equal(logits(load(path)), logits(model))


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_load_casts_dtype(tmp_path, arch):
    _, path = saved(tmp_path, arch)
    loaded = load(path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert logits(loaded).dtype == torch.bfloat16
    assert load(path, dtype="bfloat16").config.mask_token_id == 255


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_sharded_checkpoint_loads(tmp_path, arch):
    model, path = saved(tmp_path, arch)
    shard(path, names_in_first=5)
    assert torch.equal(logits(load(path)), logits(model))


def test_official_llada_layout_loads(tmp_path):
    """Official config.json keys (auto_map, OLMo-style options) and shard names."""
    model, path = saved(tmp_path, "llada")
    config = json.loads((path / "config.json").read_text())
    config.update({"auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM"}, "init_fn": "mitchell",
                   "precision": "amp_bf16", "use_cache": False, "transformers_version": "4.46.3"})
    del config["shift_logits"]
    (path / "config.json").write_text(json.dumps(config))
    rewrite_weights(path, lambda state: state.update({k: v.to(torch.bfloat16) for k, v in state.items()}))
    shard(path, names_in_first=7)
    loaded = load(path, dtype=torch.float32)
    assert isinstance(loaded, LLaDAModelLM) and loaded.config.shift_logits is False
    assert torch.allclose(logits(loaded), logits(model), atol=0.02)


def test_official_dream_layout_loads(tmp_path):
    """A Dream-org style config.json: model_type "Dream", rope_theta/rope_scaling, no shift key."""
    model, path = saved(tmp_path, "dream")
    cfg = model.config
    official = {
        "architectures": ["DreamModel"], "auto_map": {"AutoModel": "modeling_dream.DreamModel"},
        "model_type": "Dream", "attention_dropout": 0.0, "bos_token_id": 254, "eos_token_id": 254,
        "pad_token_id": 254, "hidden_act": "silu", "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "initializer_range": 0.02, "mask_token_id": 255,
        "max_position_embeddings": cfg.max_position_embeddings, "max_window_layers": 28,
        "num_attention_heads": cfg.num_attention_heads, "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads, "rms_norm_eps": 1e-6, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": False,
        "use_sliding_window": False, "vocab_size": cfg.vocab_size,
    }
    (path / "config.json").write_text(json.dumps(official))
    loaded = load(path)
    assert isinstance(loaded, Qwen2ForCausalLM)
    assert loaded.config.shift_logits is True and loaded.config.mask_token_id == 255
    assert torch.equal(logits(loaded), logits(model))


def test_build_and_build_tiny():
    assert isinstance(build(tiny_llada_config()), LLaDAModelLM)
    assert isinstance(build_tiny("llama"), LlamaForCausalLM)
    assert build_tiny("qwen2").config.shift_logits is False
    assert build_tiny("dream").config.shift_logits is True
    assert build_tiny("llada", n_kv_heads=2).config.n_kv_heads == 2
    assert all(build_tiny(a).config.mask_token_id == 255 for a in ARCHS)
    with pytest.raises(ValueError, match="unknown arch"):
        build_tiny("gpt2")


# --- refusals: each names what is wrong ------------------------------------------------------


def test_missing_config(tmp_path):
    _, path = saved(tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(path)


def test_unreadable_config(tmp_path):
    _, path = saved(tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not readable JSON"):
        load(path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "config, message",
    [({"model_type": "gpt2", "n_layer": 2}, "unknown architecture.*gpt2"),
     ({"model_type": "qwen2", "hidden_size": 64}, "no mask_token_id")],
)
def test_unknown_architecture(tmp_path, config, message):
    _, path = saved(tmp_path)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load(path)


def test_unsupported_llada_variant(tmp_path):
    _, path = saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "block_type": "sequential"}))
    with pytest.raises(CheckpointError, match="block_type"):
        load(path)


def test_missing_tensor(tmp_path):
    _, path = saved(tmp_path)
    rewrite_weights(path, lambda state: state.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.transformer\.blocks\.1\.up_proj\.weight"):
        load(path)


def test_unexpected_tensor(tmp_path):
    _, path = saved(tmp_path, "dream")
    rewrite_weights(path, lambda state: state.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.o_proj\.bias"):
        load(path)


def test_wrong_shape(tmp_path):
    _, path = saved(tmp_path)
    rewrite_weights(path, lambda state: state.update({"model.transformer.blocks.0.k_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight \(expected \[64, 64\], found \[32, 64\]"):
        load(path)


def test_many_missing_tensors_are_summarized(tmp_path):
    _, path = saved(tmp_path)
    rewrite_weights(path, lambda state: [state.pop(k) for k in list(state) if ".blocks.1." in k])
    with pytest.raises(CheckpointError, match=r"\.\.\. \(9 in all\)"):
        load(path)


def test_truncated_safetensors_file(tmp_path):
    _, path = saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file .*model\.safetensors"):
        load(path)


def test_corrupted_shard_is_named(tmp_path):
    _, path = saved(tmp_path)
    shard(path, names_in_first=5)
    (path / "model-00002-of-00002.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load(path)


def test_missing_shard(tmp_path):
    _, path = saved(tmp_path)
    shard(path, names_in_first=5)
    (path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00001-of-00002.safetensors .* is missing"):
        load(path)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    _, path = saved(tmp_path)
    shard(path, names_in_first=5)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.transformer.extra.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.transformer.extra.weight"):
        load(path)


def test_shards_without_index(tmp_path):
    _, path = saved(tmp_path)
    shard(path, names_in_first=5)
    (path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        load(path)


def test_no_weights(tmp_path):
    _, path = saved(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load(path)


def test_save_refuses_a_model_without_mask_token(tmp_path):
    model = build_tiny("llama")
    del model.config.mask_token_id
    with pytest.raises(CheckpointError, match="mask_token_id"):
        save(model, tmp_path / "x")


def test_config_that_cannot_build(tmp_path):
    _, path = saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "d_model": 65}))
    with pytest.raises(CheckpointError, match="d_model"):
        load(path)
