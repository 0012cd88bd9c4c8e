"""Dream (transformers Qwen2, bidirectional) and make_bidirectional on plain Llama/Qwen2."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from stq_compiler.models import build_dream, dream_7b_config, make_bidirectional, tiny_dream_config


def later_token_changes_earlier_logits(model: nn.Module, early: int = 2, late: int = 9) -> float:
    torch.manual_seed(1)
    ids = torch.randint(0, 250, (2, 12))
    changed = ids.clone()
    changed[:, late] = (changed[:, late] + 1) % 250
    with torch.no_grad():
        return (model(ids).logits[:, early] - model(changed).logits[:, early]).abs().max().item()


def plain_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def plain_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config).eval()


def test_dream_state_dict_keys_are_qwen2_keys():
    model = build_dream(tiny_dream_config())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for n in range(2):
        layer = f"model.layers.{n}"
        expected |= {f"{layer}.self_attn.{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")}
        expected |= {f"{layer}.self_attn.o_proj.weight"}
        expected |= {f"{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight"}
    assert set(model.state_dict()) == expected
    assert model.state_dict()["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # GQA 4/2


def test_dream_7b_config():
    cfg = dream_7b_config()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (3584, 18944, 28)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (28, 4, 152064)
    assert cfg.rms_norm_eps == 1e-6 and cfg.tie_word_embeddings is False
    assert cfg.mask_token_id == 151666 and cfg.shift_logits is True
    assert cfg._attn_implementation == "sdpa" and cfg.use_cache is False
    assert cfg.layer_types == ["full_attention"] * 28


def test_dream_model_is_configured_as_a_mask_predictor():
    model = build_dream(tiny_dream_config())
    assert model.config.mask_token_id == 255 and model.config.shift_logits is True
    assert model.config.is_causal is False
    assert all(not layer.self_attn.is_causal for layer in model.model.layers)
    assert model(torch.randint(0, 256, (3, 10))).logits.shape == (3, 10, 256)


def test_build_dream_refuses_an_unshifted_config():
    with pytest.raises(ValueError, match="shift_logits"):
        build_dream(tiny_dream_config(shift_logits=False))


def test_dream_attention_is_bidirectional():
    assert later_token_changes_earlier_logits(build_dream(tiny_dream_config())) > 1e-4


@pytest.mark.parametrize("make", [plain_llama, plain_qwen2], ids=["llama", "qwen2"])
def test_make_bidirectional_on_plain_transformers_models(make):
    model = make()
    assert later_token_changes_earlier_logits(model) == 0.0  # causal as built: the test can tell
    assert make_bidirectional(model) is model
    assert later_token_changes_earlier_logits(model) > 1e-4


@pytest.mark.parametrize("make", [plain_llama, plain_qwen2], ids=["llama", "qwen2"])
def test_bidirectional_padding_mask_is_not_causal(make):
    model = make_bidirectional(make())
    ids = torch.randint(0, 250, (1, 12))
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 250
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[:, 10:] = 0  # padding present: transformers builds a mask tensor, which must not be causal
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits[:, 2]
        after = model(changed, attention_mask=mask).logits[:, 2]
    assert (before - after).abs().max() > 1e-4


def test_compiled_dream_stays_bidirectional():
    torch._dynamo.reset()
    model = build_dream(tiny_dream_config())
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert later_token_changes_earlier_logits(compiled) > 1e-4
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits)


def test_make_bidirectional_needs_attention_modules():
    with pytest.raises(ValueError, match="is_causal"):
        make_bidirectional(nn.Linear(2, 2))
