"""Models shipped inside the package, loadable offline by name.

``stq-tiny-llada``: a 7.2 M-parameter LLaDA (6 layers, d_model 256, 8 heads, MLP 768, vocabulary
4096 byte-level BPE with ``[MASK]`` = 2) trained with the masked-diffusion objective on the King
James Bible and English Wikipedia articles (``stq_compiler.training``; model card in the README).
Its directory holds ``config.json``, ``model.safetensors`` (float16), ``tokenizer.json`` and
``training.json`` (settings and loss curve), and may hold recipes calibrated for it (``*.stq``).
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "bundled"
DEFAULT_MODEL = "stq-tiny-llada"


def bundled_names() -> list[str]:
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file()) if BUNDLED_DIR.is_dir() else []


def resolve(name_or_path: str | Path) -> Path:
    """A checkpoint directory: ``name_or_path`` itself if it exists, else the bundled model of that name."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if isinstance(name_or_path, str) and "/" not in name_or_path and (BUNDLED_DIR / name_or_path).is_dir():
        return BUNDLED_DIR / name_or_path
    return path  # load() reports the missing directory, naming the bundled models


def load_tokenizer(name_or_path: str | Path = DEFAULT_MODEL):
    """The model's tokenizer (``tokenizer.json``) as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    path = resolve(name_or_path) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path.parent}")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token="[PAD]", eos_token="[EOS]", mask_token="[MASK]")


def recipe_path(name: str, recipe: str) -> Path:
    """A recipe shipped beside a bundled model (``<model dir>/<recipe>.stq``)."""
    return resolve(name) / f"{recipe}.stq"


__all__ = ["BUNDLED_DIR", "DEFAULT_MODEL", "bundled_names", "resolve", "load_tokenizer", "recipe_path"]
