"""LLaDA: official tensor names and config, bidirectional attention, and the block math checked
against a plain float64 re-implementation written here."""

import math

import pytest
import torch

from stq_compiler.models import LLaDAConfig, LLaDAModelLM, build_tiny, llada_8b_config, tiny_llada_config
from stq_compiler.models.llada import count_parameters

# config.json of GSAI-ML/LLaDA-8B-Instruct (LLaDA-8B-Base has the same architecture keys)
OFFICIAL_8B_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081,
    "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288, "mlp_ratio": 4,
    "model_type": "llada", "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32,
    "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
    "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
    "vocab_size": 126464, "weight_tying": False,
}

BLOCK_TENSORS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out", "attn_norm", "ff_norm")


def tiny(**overrides) -> LLaDAModelLM:
    torch.manual_seed(0)
    return LLaDAModelLM(tiny_llada_config(**overrides)).eval()


def test_state_dict_keys_are_the_official_names():
    model = tiny()
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    expected |= {f"model.transformer.blocks.{n}.{t}.weight" for n in range(2) for t in BLOCK_TENSORS}
    assert set(model.state_dict()) == expected


def test_state_dict_shapes():
    cfg = tiny_llada_config(n_kv_heads=2)
    sd = LLaDAModelLM(cfg).state_dict()
    d, f, v, kv = cfg.d_model, cfg.mlp_hidden_size, cfg.vocab_size, 2 * cfg.head_dim
    assert sd["model.transformer.wte.weight"].shape == (v, d)
    assert sd["model.transformer.blocks.0.q_proj.weight"].shape == (d, d)
    assert sd["model.transformer.blocks.0.k_proj.weight"].shape == (kv, d)
    assert sd["model.transformer.blocks.0.v_proj.weight"].shape == (kv, d)
    assert sd["model.transformer.blocks.0.attn_out.weight"].shape == (d, d)
    assert sd["model.transformer.blocks.0.ff_proj.weight"].shape == (f, d)
    assert sd["model.transformer.blocks.0.up_proj.weight"].shape == (f, d)
    assert sd["model.transformer.blocks.0.ff_out.weight"].shape == (d, f)
    assert sd["model.transformer.ff_out.weight"].shape == (v, d)


def test_weight_tying_drops_the_output_matrix():
    model = tiny(weight_tying=True)
    assert "model.transformer.ff_out.weight" not in model.state_dict()
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        hidden = model.model.transformer["ln_f"](_hidden_before_ln_f(model, ids))
        assert torch.allclose(model(ids).logits, hidden @ model.model.transformer["wte"].weight.T)


def _hidden_before_ln_f(model, ids):
    captured = {}
    ln_f = model.model.transformer["ln_f"]
    handle = ln_f.register_forward_hook(lambda module, args, out: captured.setdefault("x", args[0]))
    model(ids)
    handle.remove()
    return captured["x"]


def test_official_config_reads_as_the_8b_config():
    assert LLaDAConfig.from_dict(OFFICIAL_8B_CONFIG) == llada_8b_config()
    cfg = llada_8b_config()
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers) == (4096, 32, 32, 32)
    assert (cfg.mlp_hidden_size, cfg.vocab_size, cfg.embedding_size) == (12288, 126464, 126464)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.weight_tying) == (500000.0, 1e-5, False)
    assert (cfg.mask_token_id, cfg.shift_logits) == (126336, False)


def test_8b_parameter_count_matches_the_official_checkpoint():
    # model.safetensors.index.json of LLaDA-8B-Instruct: total_size 16031162368 bytes of bfloat16
    assert count_parameters(llada_8b_config()) == 16031162368 // 2


def test_config_round_trip_and_unknown_keys():
    cfg = tiny_llada_config(n_kv_heads=2, weight_tying=True)
    assert LLaDAConfig.from_dict(cfg.to_dict()) == cfg
    assert LLaDAConfig.from_dict({**cfg.to_dict(), "some_future_key": 3}) == cfg


@pytest.mark.parametrize(
    "key, value",
    [("block_type", "sequential"), ("activation_type", "gelu"), ("scale_logits", True), ("include_bias", True)],
)
def test_config_refuses_variants_it_does_not_implement(key, value):
    with pytest.raises(ValueError, match=key):
        LLaDAConfig.from_dict({**OFFICIAL_8B_CONFIG, key: value})


def test_config_validates_heads():
    with pytest.raises(ValueError, match="n_kv_heads"):
        tiny_llada_config(n_kv_heads=3)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_output_shape(n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads)
    out = model(torch.randint(0, 256, (3, 11)))
    assert out.logits.shape == (3, 11, 256)
    assert model.config.mask_token_id == 255 and model.config.vocab_size == 256
    assert model.config.shift_logits is False


def test_padded_embedding_rows_are_not_returned():
    model = tiny(embedding_size=320)
    assert model.state_dict()["model.transformer.wte.weight"].shape == (320, 64)
    assert model(torch.randint(0, 256, (1, 5))).logits.shape == (1, 5, 256)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_attention_is_bidirectional(n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads)
    ids = torch.randint(0, 250, (2, 12))
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 250
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert (before[:, 2] - after[:, 2]).abs().max() > 1e-4  # an earlier position sees a later token


def test_padding_mask_hides_padded_keys():
    model = tiny()
    ids = torch.randint(0, 250, (1, 9))
    padded = torch.cat([ids, torch.full((1, 3), 7)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, :9], model(ids).logits)


def reference_logits(model: LLaDAModelLM, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's forward in plain float64 torch: RMSNorm, RoPE on halves, softmax attention with
    query head h reading kv head h // group, SiLU on ff_proj times up_proj."""
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    H, KV, D, eps = cfg.n_heads, cfg.effective_n_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    x = sd["model.transformer.wte.weight"][ids]
    B, L, C = x.shape
    i = torch.arange(D // 2, dtype=torch.float64)
    angle = torch.arange(L, dtype=torch.float64)[:, None] * cfg.rope_theta ** (-2.0 * i / D)
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]

    def rms(v, w):
        return w * v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)

    def rope(t):  # [B, L, heads, D]; pairs dimension j with j + D/2
        a, b = t[..., : D // 2], t[..., D // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    for n in range(cfg.n_layers):
        w = {name: sd[f"model.transformer.blocks.{n}.{name}.weight"] for name in BLOCK_TENSORS}
        h = rms(x, w["attn_norm"])
        q = rope((h @ w["q_proj"].T).view(B, L, H, D))
        k = rope((h @ w["k_proj"].T).view(B, L, KV, D))
        v = (h @ w["v_proj"].T).view(B, L, KV, D)
        heads = []
        for head in range(H):
            g = head // (H // KV)
            scores = q[:, :, head] @ k[:, :, g].transpose(1, 2) / math.sqrt(D)
            heads.append(torch.softmax(scores, dim=-1) @ v[:, :, g])
        x = x + torch.stack(heads, dim=2).reshape(B, L, C) @ w["attn_out"].T
        h = rms(x, w["ff_norm"])
        gate = h @ w["ff_proj"].T
        x = x + (gate * torch.sigmoid(gate) * (h @ w["up_proj"].T)) @ w["ff_out"].T
    x = rms(x, sd["model.transformer.ln_f.weight"])
    return x @ sd["model.transformer.ff_out.weight"].T


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_forward_matches_float64_reference(n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads).double()
    with torch.no_grad():  # weights large enough that attention is far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, reference_logits(model, ids), rtol=1e-6, atol=1e-9)


def test_bfloat16_forward_is_close_to_float32():
    model = tiny()
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_compiles_as_one_graph():
    model = tiny(n_kv_heads=2)
    ids = torch.randint(0, 256, (2, 10))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits)


def test_compiled_forward_computes_the_rotary_tables_once():
    # Inductor inlines small reused pointwise nodes into every reader: as plain ops the tables'
    # pow/cos/sin were recomputed for every element of q and k in every layer's RoPE kernel.
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = tiny(n_kv_heads=2)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(model), ids)
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    source = "\n".join(code)
    assert len(re.findall(r"torch\.ops\.stq\.rotary_tables\.default\(", source)) == 1
    assert not re.search(r"\b(cos|sin)\b", source)  # no kernel computes them again


def test_output_hidden_states_is_the_head_input():
    torch.manual_seed(0)
    model = build_tiny("llada").eval()
    ids = torch.randint(0, model.config.mask_token_id, (2, 9))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        plain = model(ids).logits
    (hidden,) = out.hidden_states
    assert torch.equal(out.logits, plain)
    torch.testing.assert_close(model.model.transformer["ff_out"](hidden), plain, rtol=0, atol=0)
