"""LLaDA: a Llama-like bidirectional mask predictor, under the official checkpoint's tensor names.

Mirrors `LLaDALlamaBlock` of GSAI-ML/LLaDA-8B-{Base,Instruct} `modeling_llada.py` (config
`block_type="llama"`, `activation_type="silu"`, `layer_norm_type="rms"`, no bias, RoPE applied in
full precision, no causal mask), so `state_dict()` keys equal the checkpoint's:

    model.transformer.wte.weight                      [embedding_size, d_model]
    model.transformer.blocks.N.attn_norm.weight       [d_model]
    model.transformer.blocks.N.{q,k,v}_proj.weight    [d_model | n_kv_heads*head_dim, d_model]
    model.transformer.blocks.N.attn_out.weight        [d_model, d_model]
    model.transformer.blocks.N.ff_norm.weight         [d_model]
    model.transformer.blocks.N.{ff_proj,up_proj}.weight  [mlp_hidden_size, d_model]
    model.transformer.blocks.N.ff_out.weight          [d_model, mlp_hidden_size]
    model.transformer.ln_f.weight                     [d_model]
    model.transformer.ff_out.weight                   [embedding_size, d_model]  (absent if weight_tying)

Block: h = x + attn_out(SDPA(rope(q), rope(k), v)), out = h + ff_out(silu(ff_proj(n)) * up_proj(n))
with n = ff_norm(h). The SiLU goes on `ff_proj` (the gate); `up_proj` is the linear branch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

# Official config keys whose value selects a code path; we implement exactly these values and
# refuse a config that asks for another one (rather than silently computing something else).
_FIXED_ARCHITECTURE = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "include_bias": False,
    "include_qkv_bias": False,
    "bias_for_layer_norm": False,
    "attention_layer_norm": False,
    "rope": True,
    "rope_full_precision": True,
    "alibi": False,
    "scale_logits": False,
    "input_emb_norm": False,
    "block_group_size": 1,
}
# The official defaults for these are None ("inherit"), which means the same as our fixed value.
_NONE_MEANS_FIXED = {"bias_for_layer_norm"}


@dataclass
class LLaDAConfig:
    """The subset of the official LLaDA `config.json` that defines the computation.

    Defaults are LLaDA-8B's. `shift_logits` is ours (False: logit i predicts token i); the sampler
    reads it, LLaDA does not shift.
    """

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = 32
    n_layers: int = 32
    mlp_hidden_size: int | None = 12288
    mlp_ratio: int = 4
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    shift_logits: bool = False

    model_type = "llada"  # class attribute, not a field

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.n_heads % self.effective_n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.effective_n_kv_heads})"
            )
        if self.embedding_size is not None and self.embedding_size < self.vocab_size:
            raise ValueError(
                f"embedding_size ({self.embedding_size}) must be >= vocab_size ({self.vocab_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def effective_n_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_size(self) -> int:  # the MLP width, as the official block computes it
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def effective_embedding_size(self) -> int:
        return self.embedding_size if self.embedding_size is not None else self.vocab_size

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "LLaDAConfig":
        """Build from an official (or our) `config.json` dict; unknown keys are ignored, but a key
        that selects an architecture variant we do not implement raises ValueError."""
        for key, supported in _FIXED_ARCHITECTURE.items():
            if key not in config:
                continue
            value = config[key]
            if value is None and key in _NONE_MEANS_FIXED:
                continue
            if value != supported:
                raise ValueError(
                    f"LLaDA config has {key}={value!r}; only {key}={supported!r} is implemented"
                )
        if config.get("multi_query_attention"):
            raise ValueError("LLaDA config has multi_query_attention=True; use n_kv_heads=1 instead")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """A `config.json` dict in the official layout (readable by `from_dict` and by the official
        code, which needs the architecture-selecting keys spelled out)."""
        return {
            "model_type": self.model_type,
            "architectures": ["LLaDAModelLM"],
            **_FIXED_ARCHITECTURE,
            **dataclasses.asdict(self),
        }


def llada_8b_config() -> LLaDAConfig:
    """LLaDA-8B-{Base,Instruct} as published (GSAI-ML config.json; LLaDA-1.5 shares it)."""
    return LLaDAConfig(
        d_model=4096,
        n_heads=32,
        n_kv_heads=32,
        n_layers=32,
        mlp_hidden_size=12288,
        mlp_ratio=4,
        vocab_size=126464,
        embedding_size=126464,
        max_sequence_length=4096,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        weight_tying=False,
        mask_token_id=126336,
        eos_token_id=126081,
        pad_token_id=126081,
    )


def tiny_llada_config(**overrides: Any) -> LLaDAConfig:
    """A 2-layer LLaDA for tests; any field can be overridden."""
    fields = dict(
        d_model=64,
        n_heads=4,
        n_kv_heads=4,
        n_layers=2,
        mlp_hidden_size=128,
        vocab_size=256,
        embedding_size=256,
        max_sequence_length=256,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        weight_tying=False,
        mask_token_id=255,
        eos_token_id=254,
        pad_token_id=254,
    )
    fields.update(overrides)
    return LLaDAConfig(**fields)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The official norms and RoPE upcast half precision to float32; float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


class LLaDARMSNorm(nn.Module):
    """RMSNorm as the official `RMSLayerNorm`: normalize in at least float32, cast back, scale.

    Same math as transformers' LlamaRMSNorm for half/float32 inputs, but it does not downcast
    float64 inputs to float32 (so a float64 model is exact to float64).
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(_compute_dtype(x.dtype))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@torch.library.custom_op("stq::rotary_tables", mutates_args=())
def rotary_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim] for positions 0..seq_len-1, halves duplicated (the
    official `RotaryEmbedding` layout). An op of its own so that a compiled forward computes the
    tables once: as plain pointwise ops Inductor inlined them into every layer's RoPE kernel
    (a reused pointwise node is realized only above 4 reads or 30 ops), which recomputed pow, cos
    and sin for every element of q and k in every layer."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim))
    positions = torch.arange(seq_len, device=device, dtype=dtype)
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


@rotary_tables.register_fake
def _(seq_len, head_dim, theta, device, dtype):
    shape = (seq_len, head_dim)
    return torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype)


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim] (``stq::rotary_tables``). Computed on the fly, so no
    buffer appears in the state_dict and a dtype cast of the model cannot degrade the
    frequencies."""
    return rotary_tables(seq_len, head_dim, float(theta), device, dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] rotated in the tables' dtype, returned in x's dtype."""
    h = x.to(cos.dtype)
    return (h * cos + _rotate_half(h) * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """One `LLaDALlamaBlock`: pre-norm bidirectional attention, then pre-norm SwiGLU MLP."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, kv_width = config.d_model, config.effective_n_kv_heads * config.head_dim
        self.n_heads = config.n_heads
        self.n_kv_heads = config.effective_n_kv_heads
        self.head_dim = config.head_dim
        self.attn_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_width, bias=False)
        self.v_proj = nn.Linear(d, kv_width, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.hidden_size, bias=False)
        self.ff_out = nn.Linear(config.hidden_size, d, bias=False)

    def attention(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, L, C = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            # query head h reads kv head h // group, as the official repeat_interleave does
            group = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)
        # heads merged back to width C: the point where TAC sits, right before attn_out
        return self.attn_out(z.transpose(1, 2).reshape(B, L, C))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x), cos, sin, attn_mask)
        return x + self.mlp(self.ff_norm(x))


class LLaDAModel(nn.Module):
    """The official `LLaDAModel`: everything lives under `.transformer`."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        modules: dict[str, nn.Module] = {
            "wte": nn.Embedding(config.effective_embedding_size, config.d_model),
            "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            "ln_f": LLaDARMSNorm(config.d_model, config.rms_norm_eps),
        }
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.effective_embedding_size, bias=False)
        self.transformer = nn.ModuleDict(modules)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, output_hidden_states: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, L, vocab]; with ``output_hidden_states`` also the LM head's input (after ln_f)."""
        cfg = self.config
        x = self.transformer["wte"](input_ids)
        cos, sin = rotary_cos_sin(
            input_ids.shape[1], cfg.head_dim, cfg.rope_theta, x.device, _compute_dtype(x.dtype)
        )
        attn_mask = None
        if attention_mask is not None:
            # [B, L] with 1 = real token, 0 = padding -> keys to ignore, broadcast over heads/queries.
            # (The official code also switches to a causal bias when padding is present; we keep
            # the attention bidirectional.)
            attn_mask = attention_mask.bool()[:, None, None, :]
        for block in self.transformer["blocks"]:
            x = block(x, cos, sin, attn_mask)
        x = self.transformer["ln_f"](x)
        if cfg.weight_tying:
            logits = F.linear(x, self.transformer["wte"].weight)
        else:
            logits = self.transformer["ff_out"](x)
        if cfg.effective_embedding_size != cfg.vocab_size:
            logits = logits[..., : cfg.vocab_size]
        return (logits, x) if output_hidden_states else logits


class LLaDAModelLM(nn.Module):
    """`model(input_ids, attention_mask=None).logits` is [B, L, vocab_size]; no logit shift."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LLaDAModel(config)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init for models built without a checkpoint: N(0, std) matrices, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, LLaDARMSNorm):
                module.weight.fill_(1.0)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, output_hidden_states: bool = False
    ) -> CausalLMOutput:
        """``.logits``; with ``output_hidden_states``, ``.hidden_states = (final,)``: the normed
        last hidden state the LM head reads (the official model returns every layer's)."""
        if not output_hidden_states:
            return CausalLMOutput(logits=self.model(input_ids, attention_mask))
        logits, hidden = self.model(input_ids, attention_mask, output_hidden_states=True)
        return CausalLMOutput(logits=logits, hidden_states=(hidden,))


def count_parameters(config: LLaDAConfig) -> int:
    """Parameter count implied by a config (LLaDA-8B: 8.02e9), without building the model."""
    d, kv, f, v = config.d_model, config.effective_n_kv_heads * config.head_dim, config.hidden_size, (
        config.effective_embedding_size
    )
    block = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
    head = 0 if config.weight_tying else v * d
    return v * d + config.n_layers * block + d + head


__all__ = [
    "LLaDAConfig",
    "LLaDAModelLM",
    "LLaDAModel",
    "LLaDABlock",
    "LLaDARMSNorm",
    "llada_8b_config",
    "tiny_llada_config",
    "rotary_cos_sin",
    "apply_rotary",
    "count_parameters",
]
