"""Dream (transformers Qwen2, bidirectional) and make_bidirectional on plain Llama/Qwen2."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from stq_compiler.models import build_dream, dream_7b_config, make_bidirectional, tiny_dream_config
from stq_compiler.models.dream import BIDIRECTIONAL_SDPA, bidirectional_sdpa_mask


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


def test_bidirectional_sdpa_mask_is_none_only_without_padding():
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    common = dict(batch_size=2, q_length=6, kv_length=6, device="cpu")
    # no padding mask, full attention: no mask at all (transformers 5.17 builds an all-True one while tracing)
    assert bidirectional_sdpa_mask(**common, mask_function=bidirectional_mask_function, attention_mask=None,
                                   allow_is_bidirectional_skip=True) is None
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[1, 4:] = False
    cases = [
        dict(mask_function=bidirectional_mask_function, attention_mask=padding, allow_is_bidirectional_skip=True),
        dict(mask_function=causal_mask_function, attention_mask=None, allow_is_causal_skip=False),  # a causal builder
        dict(mask_function=bidirectional_mask_function, attention_mask=None, allow_is_bidirectional_skip=True, local_size=3),
    ]
    for case in cases:
        ours, theirs = bidirectional_sdpa_mask(**common, **case), sdpa_mask(**common, **case)
        assert ours is not None and torch.equal(ours, theirs)
    assert not bidirectional_sdpa_mask(**common, **cases[0])[1, 0, 0, 4:].any()  # padded keys stay masked


@pytest.mark.parametrize("make", [lambda: build_dream(tiny_dream_config()), plain_llama], ids=["dream", "llama"])
def test_compiled_attention_gets_no_mask_without_padding(make):
    # what torch.compile sees: SDPA with attn_mask=None (flash attention can run) and grouped k/v
    # heads (enable_gqa) instead of repeated ones, whatever the transformers version; with padding,
    # a mask
    model = make_bidirectional(make())
    assert model.config._attn_implementation == BIDIRECTIONAL_SDPA
    calls = []

    def backend(gm, example_inputs):
        calls.extend(n for n in gm.graph.nodes if n.target is torch._C._nn.scaled_dot_product_attention)
        return gm.forward

    torch._dynamo.reset()
    ids = torch.randint(0, 250, (2, 12))
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, 9:] = 0
    with torch.no_grad():
        for attention_mask in (None, padding):
            calls.clear()
            want = model(ids, attention_mask=attention_mask).logits
            torch.testing.assert_close(torch.compile(model, backend=backend)(ids, attention_mask=attention_mask).logits, want)
            assert len(calls) == 2
            for node in calls:
                assert (node.kwargs.get("attn_mask") is None) == (attention_mask is None)
                if attention_mask is None:
                    assert node.kwargs.get("enable_gqa") is True
                    assert node.args[1].meta["example_value"].shape[1] == 2  # the 2 k/v heads, not 4 repeated


def test_make_bidirectional_needs_attention_modules():
    with pytest.raises(ValueError, match="is_causal"):
        make_bidirectional(nn.Linear(2, 2))
