"""Local checkpoints: `load` a LLaDA / Dream / bidirectional Llama or Qwen2 from a directory,
`save` one, `build` / `build_tiny` random-init models.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards
`model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json` (the Hugging Face
layout). Nothing touches the network and no code from the checkpoint is run: the architecture is
read from config.json (`model_type` "llada" or LLaDA's d_model/n_layers keys; "Dream"; "qwen2" or
"llama" carrying a `mask_token_id`). `load` checks every tensor name and shape against the model
before reading any tensor data, and either returns a complete model or raises CheckpointError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel, Qwen2Config

from stq_compiler.models.dream import build_decoder, build_dream, dream_config, tiny_dream_config
from stq_compiler.models.llada import LLaDAConfig, LLaDAModelLM, tiny_llada_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURES = ("llada", "dream", "llama", "qwen2")

# config.json keys that describe the file rather than the model
_FILE_KEYS = {"architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file or tensors."""


# ---------------------------------------------------------------------------------------------
# building


def build(config: LLaDAConfig | PretrainedConfig) -> nn.Module:
    """A random-init bidirectional model for `config`: an LLaDAConfig, or a transformers
    Llama/Qwen2 config carrying `mask_token_id` (Dream: a Qwen2 config with shift_logits=True)."""
    if isinstance(config, LLaDAConfig):
        return LLaDAModelLM(config).eval()
    if isinstance(config, PretrainedConfig):
        return build_decoder(config)
    raise TypeError(f"build() takes an LLaDAConfig or a transformers config, not {type(config).__name__}")


def build_tiny(arch: str, **overrides: Any) -> nn.Module:
    """A 2-layer random-init model of `arch` in {"llada", "dream", "llama", "qwen2"} (vocab 256,
    mask id 255). Overrides use the arch's config keys (d_model for llada, hidden_size otherwise)."""
    if arch == "llada":
        return build(tiny_llada_config(**overrides))
    if arch == "dream":
        return build_dream(tiny_dream_config(**overrides))
    if arch == "qwen2":
        return build(tiny_dream_config(**{"shift_logits": False, **overrides}))
    if arch == "llama":
        fields: dict[str, Any] = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            mask_token_id=255,
        )
        fields.update(overrides)
        return build(config_from_dict("llama", fields))
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHITECTURES}")


# ---------------------------------------------------------------------------------------------
# reading config.json


def detect_architecture(config: dict[str, Any]) -> str:
    """"llada", "dream", "llama" or "qwen2" for a config.json dict; CheckpointError otherwise."""
    model_type = str(config.get("model_type", "")).lower()
    if model_type == "llada" or (not model_type and {"d_model", "n_layers"} <= config.keys()):
        return "llada"
    if model_type == "dream":
        return "dream"
    if model_type in ("qwen2", "llama"):
        if config.get("mask_token_id") is None:
            raise CheckpointError(
                f"config.json has model_type {model_type!r} but no mask_token_id: an autoregressive "
                "checkpoint, not a diffusion LLM"
            )
        if model_type == "qwen2" and config.get("shift_logits", True):
            return "dream"  # a Qwen2 mask predictor with shifted logits is Dream's layout
        return model_type
    raise CheckpointError(
        f"unknown architecture in config.json: model_type={config.get('model_type')!r}, "
        f"architectures={config.get('architectures')!r}; supported: LLaDA (model_type 'llada'), "
        "Dream (model_type 'Dream'), or a 'qwen2'/'llama' config with a mask_token_id"
    )


def config_from_dict(arch: str, config: dict[str, Any]) -> LLaDAConfig | PretrainedConfig:
    """The model config for a config.json dict of a known arch."""
    if arch == "llada":
        return LLaDAConfig.from_dict(config)
    fields = {k: v for k, v in config.items() if k not in _FILE_KEYS}
    if arch == "dream":
        return dream_config(**fields)
    mask_token_id = fields.pop("mask_token_id")
    shift_logits = fields.pop("shift_logits", False)
    fields.pop("use_cache", None)
    out = (Qwen2Config if arch == "qwen2" else LlamaConfig)(use_cache=False, **fields)
    out.mask_token_id = mask_token_id
    out.shift_logits = shift_logits
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {path}")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object, found {type(config).__name__}")
    return config


# ---------------------------------------------------------------------------------------------
# reading tensors


@dataclass(frozen=True)
class _TensorEntry:
    file: Path
    shape: tuple[int, ...]


def _weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint, and the index's name -> file map when sharded."""
    index_file, single = path / INDEX_FILE, path / WEIGHTS_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_file} is not a safetensors index with a weight_map: {exc}") from exc
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file} has an empty or malformed weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"shard {file.name} listed in {INDEX_FILE} is missing from {path}")
        return files, weight_map
    if single.is_file():
        return [single], None
    if list(path.glob("model-*-of-*.safetensors")):
        raise CheckpointError(f"{path} holds safetensors shards but no {INDEX_FILE}")
    if (path / "pytorch_model.bin").exists():
        raise CheckpointError(f"{path} holds pytorch_model.bin; only safetensors checkpoints are loaded")
    raise CheckpointError(f"no weights in {path}: expected {WEIGHTS_FILE} or {INDEX_FILE} with shards")


def _scan_headers(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, _TensorEntry]:
    """Every tensor's file and shape, read from the safetensors headers only."""
    entries: dict[str, _TensorEntry] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    if name in entries:
                        raise CheckpointError(
                            f"tensor {name} is stored twice, in {entries[name].file.name} and {file.name}"
                        )
                    entries[name] = _TensorEntry(file, tuple(handle.get_slice(name).get_shape()))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read safetensors file {file}: {exc}") from exc
    if weight_map is not None:
        for name, file_name in weight_map.items():
            if name not in entries:
                raise CheckpointError(f"{INDEX_FILE} lists tensor {name} in {file_name}, which lacks it")
            if entries[name].file.name != file_name:
                raise CheckpointError(
                    f"{INDEX_FILE} lists tensor {name} in {file_name} but it is in {entries[name].file.name}"
                )
    return entries


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter names that are the same Parameter as an earlier name (alias -> original), e.g.
    lm_head.weight -> model.embed_tokens.weight in a model with tied embeddings."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _names(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_tensors(
    path: Path, expected: dict[str, tuple[int, ...]], found: dict[str, _TensorEntry], aliases: dict[str, str]
) -> None:
    missing = expected.keys() - found.keys()
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing tensors: {_names(missing)}")
    unexpected = found.keys() - expected.keys() - aliases.keys()
    if unexpected:
        raise CheckpointError(f"checkpoint {path} has unexpected tensors: {_names(unexpected)}")
    wrong = [
        f"{name} (expected {list(shape)}, found {list(found[name].shape)} in {found[name].file.name})"
        for name, shape in sorted(expected.items())
        if found[name].shape != shape
    ]
    if wrong:
        more = f"; ... ({len(wrong)} in all)" if len(wrong) > 3 else ""
        raise CheckpointError(f"checkpoint {path} has tensors of the wrong shape: {'; '.join(wrong[:3])}{more}")


def _read_tensors(
    entries: dict[str, _TensorEntry], names: set[str], dtype: torch.dtype | None, device: torch.device
) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in sorted(names):
        by_file.setdefault(entries[name].file, []).append(name)
    state: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        try:
            with safe_open(file, framework="pt", device=str(device)) as handle:
                for name in file_names:
                    tensor = handle.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    state[name] = tensor
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read tensor data from {file}: {exc}") from exc
    return state


def _materialize_rotary_buffers(model: nn.Module, device: torch.device) -> None:
    """Rebuild modules whose (non-persistent, never saved) buffers are still on the meta device:
    transformers' rotary embeddings, whose inv_freq is computed from the config."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        config = getattr(module, "config", None)
        if not type(module).__name__.endswith("RotaryEmbedding") or config is None:
            raise CheckpointError(f"module {name} ({type(module).__name__}) has buffers no checkpoint holds")
        with torch.device(device):
            fresh = type(module)(config=config)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, fresh)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


# ---------------------------------------------------------------------------------------------
# load / save


def load(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a diffusion LLM from a local checkpoint directory, or a bundled model by name
    (``load("stq-tiny-llada")``), in eval mode.

    dtype: cast floating tensors to it (None keeps the file's dtypes). device: where the tensors
    are read to. Raises CheckpointError naming the problem: missing config.json, unknown
    architecture, missing/unexpected tensors, shape mismatches, unreadable safetensors files.
    """
    from stq_compiler.models.bundled import bundled_names, resolve

    path = resolve(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist (bundled models: {', '.join(bundled_names()) or 'none'})")
    raw = read_config(path)
    arch = detect_architecture(raw)
    try:
        config = config_from_dict(arch, raw)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE} does not describe a valid {arch} model: {exc}") from exc
    files, weight_map = _weight_files(path)
    entries = _scan_headers(files, weight_map)

    # Build on the meta device: shapes for the checks, and no time spent on a random init.
    try:
        with torch.device("meta"):
            model = build(config)
    except (ValueError, TypeError, AssertionError, RuntimeError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE} does not describe a buildable {arch} model: {exc}") from exc
    aliases = _tied_aliases(model)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in aliases}
    _check_tensors(path, expected, entries, aliases)

    device = torch.device(device)
    state = _read_tensors(entries, set(expected), _as_dtype(dtype), device)
    for alias, original in aliases.items():
        state[alias] = state[original]
    model.load_state_dict(state, strict=True, assign=True)
    for alias, original in aliases.items():  # assign=True made two Parameters; tie them again
        parent, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, model.get_parameter(original))
    _materialize_rotary_buffers(model, device)

    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"checkpoint {path} left tensors unloaded: {_names(leftover)}")
    return model.eval()


def save(model: nn.Module, path: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` for a model `load` can read back. Tied weights
    are written once. Returns the directory."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper saves its module
    path = Path(path)
    if (path / INDEX_FILE).exists():
        raise CheckpointError(f"{path} already holds a sharded checkpoint ({INDEX_FILE}); save elsewhere")
    if isinstance(model, LLaDAModelLM):
        config = model.config.to_dict()
    elif isinstance(model, PreTrainedModel):
        config = model.config.to_dict()
        config["architectures"] = config.get("architectures") or [type(model).__name__]
        for key in ("mask_token_id", "shift_logits"):
            if getattr(model.config, key, None) is None:
                raise CheckpointError(f"{type(model).__name__}.config has no {key}; not a diffusion LLM")
    else:
        raise TypeError(f"save() takes an LLaDAModelLM or a transformers model, not {type(model).__name__}")
    aliases = _tied_aliases(model)
    state = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in model.state_dict().items()
        if name not in aliases
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return path


__all__ = [
    "CheckpointError",
    "build",
    "build_tiny",
    "load",
    "save",
    "detect_architecture",
    "config_from_dict",
    "read_config",
]
