"""The diffusion LLMs the compiler runs: LLaDA (our module, official tensor names), Dream
(transformers' Qwen2, bidirectional, shifted logits), transformers' Llama/Qwen2 made bidirectional,
and loading/saving local safetensors checkpoints of all of them."""

from stq_compiler.models.bundled import DEFAULT_MODEL, bundled_names, load_tokenizer
from stq_compiler.models.checkpoint import (
    CheckpointError,
    build,
    build_tiny,
    detect_architecture,
    load,
    save,
)
from stq_compiler.models.dream import (
    DREAM_MASK_TOKEN_ID,
    build_dream,
    dream_7b_config,
    dream_config,
    make_bidirectional,
    tiny_dream_config,
)
from stq_compiler.models.llada import (
    LLaDAConfig,
    LLaDAModelLM,
    llada_8b_config,
    tiny_llada_config,
)

__all__ = [
    "DEFAULT_MODEL",
    "bundled_names",
    "load_tokenizer",
    "CheckpointError",
    "build",
    "build_tiny",
    "detect_architecture",
    "load",
    "save",
    "DREAM_MASK_TOKEN_ID",
    "build_dream",
    "dream_7b_config",
    "dream_config",
    "make_bidirectional",
    "tiny_dream_config",
    "LLaDAConfig",
    "LLaDAModelLM",
    "llada_8b_config",
    "tiny_llada_config",
]
