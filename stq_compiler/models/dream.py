"""Dream-7B, and transformers' Llama/Qwen2 decoders run bidirectionally.

Dream-v0-{Base,Instruct}-7B is Qwen2.5-7B's layout (q/k/v bias, no o_proj bias, GQA 28/4 heads,
RMSNorm eps 1e-6, SwiGLU, RoPE theta 1e6, untied lm_head) trained as a mask predictor: attention
is bidirectional, `[MASK]` is token 151666, and its logits are shifted by one (logit i predicts
token i+1, so the sampler reads position i's prediction from output i-1). The checkpoint's tensor
names are Qwen2's, so we run it as transformers' `Qwen2ForCausalLM`, made bidirectional.

How attention becomes bidirectional in transformers 5.x (checked on 5.17 and 5.24):
* `config.is_causal = False` is the switch. The decoder's forward decorator
  (`merge_with_config_defaults`) forwards it as an `is_causal=False` kwarg to every attention call,
  which the SDPA integration passes to `F.scaled_dot_product_attention`, and the mask builder then
  calls `create_bidirectional_mask`: None without padding, a key-padding mask (no causal triangle)
  when a 2-D attention_mask with zeros is given.
* every attention module's own `is_causal` flag is set False too, for attention code reached
  without that decorator (the SDPA integration falls back to the flag).
Setting only the module flags is not enough: a padding mask would still come back causal.
Under torch.compile, transformers 5.17 materializes an all-True boolean [B, 1, L, L] mask (it will
not look at a padding mask's values while tracing, and skips the mask only outside tracing), so
SDPA gets an `attn_mask` (no flash kernel) and the k/v heads are repeated instead of `enable_gqa`;
5.24 skips the mask when there is no padding mask at all. The decoders here run their attention
as `BIDIRECTIONAL_SDPA`: transformers' own SDPA attention, with a mask builder that returns no mask
when the model gets no padding mask (full attention needs none) and transformers' SDPA mask
otherwise, so every version passes `attn_mask=None` and `enable_gqa` without padding.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import (
    AttentionInterface, AttentionMaskInterface, LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

DREAM_MASK_TOKEN_ID = 151666
BIDIRECTIONAL_SDPA = "stq_bidirectional_sdpa"


def bidirectional_sdpa_mask(*args: Any, attention_mask=None, allow_is_bidirectional_skip: bool = False,
                            local_size: int | None = None, **kwargs: Any):
    """transformers' SDPA mask builder, except that a full bidirectional mask with no padding mask
    is no mask, also while tracing (where transformers 5.17 builds an all-True one)."""
    if attention_mask is None and allow_is_bidirectional_skip and local_size is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, allow_is_bidirectional_skip=allow_is_bidirectional_skip,
                     local_size=local_size, **kwargs)


AttentionInterface.register(BIDIRECTIONAL_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])
AttentionMaskInterface.register(BIDIRECTIONAL_SDPA, bidirectional_sdpa_mask)


def make_bidirectional(model: nn.Module) -> nn.Module:
    """Turn a transformers decoder (Llama, Qwen2, ...) into a full-attention mask predictor, in place.

    Sets `is_causal = False` on the model's config and on every module that carries an
    `is_causal` flag (the attention layers), turns the KV cache off (a cache of bidirectional
    keys is stale as soon as any token changes) and switches SDPA attention to
    `BIDIRECTIONAL_SDPA` (no mask without padding, see the module docstring). Returns the model.
    """
    touched = 0
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
            touched += 1
        if isinstance(module, PreTrainedModel):
            module.config.is_causal = False
            module.config.use_cache = False
            if module.config._attn_implementation == "sdpa":
                module.config._attn_implementation = BIDIRECTIONAL_SDPA
    if touched == 0:
        raise ValueError(f"{type(model).__name__} has no attention module with an `is_causal` flag")
    return model


def dream_7b_config() -> Qwen2Config:
    """Dream-v0-{Base,Instruct}-7B: Qwen2.5-7B's shapes (which Dream keeps: it is initialized from
    Qwen2.5-7B), Dream's [MASK] 151666 and pad/eos 151643, no sliding window."""
    return dream_config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        hidden_act="silu",
        attention_dropout=0.0,
        use_sliding_window=False,
        max_window_layers=28,
        bos_token_id=151643,
        eos_token_id=151643,
        pad_token_id=151643,
        mask_token_id=DREAM_MASK_TOKEN_ID,
    )


def tiny_dream_config(**overrides: Any) -> Qwen2Config:
    """A 2-layer Dream (Qwen2 layout, GQA 4/2) for tests; keys are Qwen2Config's."""
    fields: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        mask_token_id=255,
    )
    fields.update(overrides)
    return dream_config(**fields)


def dream_config(**fields: Any) -> Qwen2Config:
    """A Dream config from Qwen2Config keyword arguments (plus mask_token_id, shift_logits):
    SDPA attention, bidirectional, no KV cache."""
    mask_token_id = fields.pop("mask_token_id", DREAM_MASK_TOKEN_ID)
    shift_logits = fields.pop("shift_logits", True)
    fields.pop("use_cache", None)
    fields.pop("attn_implementation", None)
    config = Qwen2Config(attn_implementation="sdpa", use_cache=False, **fields)
    config.mask_token_id = mask_token_id
    config.shift_logits = shift_logits
    config.is_causal = False
    return config


def build_decoder(config: LlamaConfig | Qwen2Config) -> LlamaForCausalLM | Qwen2ForCausalLM:
    """A random-init transformers Llama/Qwen2 `...ForCausalLM` with SDPA attention, made
    bidirectional. The config must carry `mask_token_id`; `shift_logits` defaults to False."""
    classes = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}
    if config.model_type not in classes:
        raise ValueError(f"unsupported transformers model_type {config.model_type!r}; expected llama or qwen2")
    if getattr(config, "mask_token_id", None) is None:
        raise ValueError(f"{type(config).__name__} has no mask_token_id; a mask predictor needs one")
    if not hasattr(config, "shift_logits"):
        config.shift_logits = False
    config._attn_implementation = "sdpa"
    return make_bidirectional(classes[config.model_type](config)).eval()


def build_dream(config: Qwen2Config | None = None) -> Qwen2ForCausalLM:
    """A random-init Dream (default: Dream-7B's shapes). Keys: model.embed_tokens.weight,
    model.layers.N.self_attn.{q,k,v,o}_proj.*, model.layers.N.mlp.{gate,up,down}_proj.weight,
    model.layers.N.{input,post_attention}_layernorm.weight, model.norm.weight, lm_head.weight."""
    config = dream_7b_config() if config is None else config
    if not getattr(config, "shift_logits", True):
        raise ValueError("a Dream config has shift_logits=True; use build_decoder for an unshifted Qwen2")
    config.shift_logits = True
    return build_decoder(config)


__all__ = [
    "DREAM_MASK_TOKEN_ID",
    "BIDIRECTIONAL_SDPA",
    "bidirectional_sdpa_mask",
    "make_bidirectional",
    "dream_7b_config",
    "tiny_dream_config",
    "dream_config",
    "build_decoder",
    "build_dream",
]
