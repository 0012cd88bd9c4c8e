"""The options a user passes as ``torch.compile(model, backend="starquant", options={...})``.

Unknown keys and unsupported values are refused with a message naming them: a typo must never
compile a silently different model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

BITS_CHOICES = (4, 8, 16)
TOKEN_STATE_CHOICES = ("auto", "required", "off")
# torch.compile's modes (torch._inductor.list_mode_options); "default" means no CUDA graphs.
MODE_CHOICES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

DEBUG_DIR_ENV = "STQ_DEBUG_DIR"


@dataclass(frozen=True)
class BackendOptions:
    """Validated backend options.

    * ``w_bits`` / ``a_bits``: weight and activation bits, 4 or 8; 16 means not quantized. Both
      16 turns quantization off; one quantized and the other 16 is refused (no weight-only or
      activation-only path yet).
    * ``recipe``: a calibrated ``Recipe`` or its path (STaR-Quant / baselines). Without one, every
      eligible linear gets round-to-nearest (RTN) quantization.
    * ``mask_token_id``: the ``[MASK]`` id that defines the token state ``is_masked``.
    * ``token_state``: ``"auto"`` inserts the state when a mask id and an ``input_ids`` input are
      there; ``"required"`` refuses a graph without them; ``"off"`` never inserts it.
    * ``quantize_head``: also quantize the LM head (off by default, as in the paper).
    * ``quantize_embedding``: the token embedding reads int8 rows (one float32 scale a row) instead
      of the float table; ``passes/quantize_embedding.py``. Weight-only, so it is allowed with
      ``w_bits=a_bits=16`` too (the graph is then inference-only, like a quantized one), and with a
      recipe (calibration does not see the embedding). An LM head tied to the embedding keeps
      reading the float table unless ``quantize_head`` is on too.
    * ``debug_dir``: write, per pass, the readable graph, a diff, graph exports and the pass table
      here (or set ``STQ_DEBUG_DIR``), as ``stq inspect --dump`` does.
    * ``fuse``: replace each site's quantizer and its prologue (RMSNorm, TAC, smoothing, Kronecker)
      with ``stq.fused_quantize`` and the linears with ``stq.fused_linear`` on packed weights (q/k/v
      as one GEMM, gate/up likewise, residual adds in the GEMM); ``passes/fuse.py``. Default
      (``None``): on when the model's weights are on a CUDA device, off elsewhere. On the H200
      the fused step is much faster than the unfused one (LLaDA-8B W4A4 at 1 × 1024 with CUDA
      graphs: 23.2 ms against 38.0 in an earlier run) and holds 4-bit weights packed two a
      byte, where the unfused graph holds one a byte (README, Speed). On the CPU both run the
      reference ops; the fused graph has not been timed there.
    * ``swiglu_epilogue``: with ``fuse``, gate/up as one GEMM that applies ``silu(gate) * up`` in
      its epilogue instead of a stacked GEMM and Inductor's SiLU·mul kernel. Off by default: on
      the H200 both take as long (``passes/fuse.py``).
    * ``mode``: Inductor's compile mode, as ``torch.compile(mode=...)`` takes it (``torch.compile``
      refuses ``mode=`` next to ``options=``, so it is an option here too). Default (``None``):
      ``"reduce-overhead"`` (CUDA graphs) for a quantized graph whose weights are on a CUDA
      device, ``"default"`` elsewhere. The quantized ops are custom ops launched from Python, a
      few dozen µs each; without CUDA graphs the GPU waits for them (LLaDA-8B W4A4 on the H200:
      63.7 ms a step in ``"default"`` in an earlier run, 23.2 ms with CUDA graphs; README, Speed). Under CUDA graphs
      a call's outputs are overwritten by the next call: clone what you keep across calls.
    * ``inductor``: hand the rewritten graph to Inductor (default); ``False`` runs it as FX code.
    * ``inductor_config``: extra Inductor config patches.
    """

    w_bits: int = 4
    a_bits: int = 4
    recipe: Any = None
    mask_token_id: Optional[int] = None
    token_state: str = "auto"
    quantize_head: bool = False
    quantize_embedding: bool = False
    debug_dir: Optional[str] = None
    fuse: Optional[bool] = None
    swiglu_epilogue: bool = False
    mode: Optional[str] = None
    inductor: bool = True
    inductor_config: dict = field(default_factory=dict)

    @property
    def quantize(self) -> bool:
        return self.w_bits < 16

    def fuse_for(self, tensors) -> bool:
        """Whether the fusion pass runs on a graph reading ``tensors``: ``fuse``, or with
        ``None`` whether any of them is on a CUDA device (and there are quantized linears)."""
        if self.fuse is not None:
            return self.fuse
        return self.quantize and any(getattr(t, "is_cuda", False) for t in tensors)

    def mode_for(self, tensors) -> str:
        """Inductor's compile mode for a graph reading ``tensors``: ``mode``, or with ``None``
        CUDA graphs when the graph is quantized and any of them is on a CUDA device."""
        if self.mode is not None:
            return self.mode
        cuda = any(getattr(t, "is_cuda", False) for t in tensors)
        return "reduce-overhead" if cuda and self.quantize else "default"

    @property
    def inference_only(self) -> bool:
        """Quantized constants replace weights: the compiled graph runs without autograd."""
        return self.quantize or self.quantize_embedding

    def cache_key(self) -> str:
        """SHA-256 (hex) of everything in these options that decides the compiled graph.

        The recipe enters as ``Recipe.digest()`` (what it does, not who made it or where it lies);
        ``debug_dir`` is left out: where graphs are dumped changes no compiled code. Equal options
        give equal keys; a different recipe (tensor, bits, mask id, method options) or any other
        option gives a different one. Versions of torch and of this package are not in the key: a
        cache kept across upgrades must add them.
        """
        from stq_compiler.recipe import Recipe

        recipe = self.recipe
        if recipe is not None and not isinstance(recipe, Recipe):
            recipe = Recipe.load(recipe)  # options built directly, not through from_dict
        content = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "debug_dir"}
        content["recipe"] = recipe.digest() if recipe is not None else None
        # default=repr: Inductor config values that JSON cannot hold (stable within a process)
        text = json.dumps({"stq_backend_options": 1, **content}, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def from_dict(cls, options: Optional[dict]) -> "BackendOptions":
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"starquant: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"known options are {', '.join(sorted(known))}"
            )
        if options.get("debug_dir") is None and os.environ.get(DEBUG_DIR_ENV):
            options["debug_dir"] = os.environ[DEBUG_DIR_ENV]
        if options.get("recipe") is not None:
            options.update(_settings_from_recipe(options))
        opts = cls(**options)
        opts._validate()
        return opts

    def _validate(self) -> None:
        for name in ("w_bits", "a_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in BITS_CHOICES:
                raise ValueError(
                    f"starquant: option {name}={value!r} is not a supported bit width; "
                    f"choose one of {BITS_CHOICES} (16 = not quantized)"
                )
        if (self.w_bits == 16) != (self.a_bits == 16):
            raise ValueError(
                f"starquant: w_bits={self.w_bits} with a_bits={self.a_bits} is not supported; "
                "quantize both (4 or 8 bits each) or neither (16/16)"
            )
        if self.token_state not in TOKEN_STATE_CHOICES:
            raise ValueError(
                f"starquant: option token_state={self.token_state!r}; choose one of {TOKEN_STATE_CHOICES}"
            )
        if self.mask_token_id is not None and (
            isinstance(self.mask_token_id, bool) or not isinstance(self.mask_token_id, int) or self.mask_token_id < 0
        ):
            raise ValueError(f"starquant: mask_token_id must be a non-negative int, got {self.mask_token_id!r}")
        if self.token_state == "required" and self.mask_token_id is None:
            raise ValueError(
                "starquant: token_state='required' needs the mask token id: pass options['mask_token_id'] "
                "(LLaDA 126336, Dream 151666)"
            )
        if not isinstance(self.quantize_embedding, bool):
            raise ValueError(f"starquant: option quantize_embedding must be True or False, got {self.quantize_embedding!r}")
        if self.fuse is not None and not isinstance(self.fuse, bool):
            raise ValueError(f"starquant: option fuse must be True, False or None (on for CUDA weights), got {self.fuse!r}")
        if self.fuse and not self.quantize:
            raise ValueError("starquant: fuse=True fuses quantized linears; with w_bits=a_bits=16 there are none")
        if not isinstance(self.swiglu_epilogue, bool):
            raise ValueError(f"starquant: option swiglu_epilogue must be True or False, got {self.swiglu_epilogue!r}")
        if self.mode is not None and self.mode not in MODE_CHOICES:
            raise ValueError(f"starquant: option mode={self.mode!r}; choose one of {MODE_CHOICES} or None (CUDA graphs for CUDA weights)")
        if self.mode not in (None, "default") and not self.inductor:
            raise ValueError(f"starquant: option mode={self.mode!r} is an Inductor mode; with inductor=False there is none")
        if not isinstance(self.inductor_config, dict):
            raise ValueError("starquant: option inductor_config must be a dict of Inductor config patches")


def _settings_from_recipe(options: dict) -> dict:
    """Load the recipe (a ``Recipe`` or a path) and take bits and mask id from it; options that
    contradict the recipe are refused rather than silently overridden."""
    from stq_compiler.recipe import Recipe

    recipe = options["recipe"]
    if not isinstance(recipe, Recipe):
        if not isinstance(recipe, (str, os.PathLike)):
            raise ValueError(f"starquant: option recipe must be a Recipe or a path, got {type(recipe).__name__}")
        recipe = Recipe.load(recipe)
    settings = {"recipe": recipe}
    for name, value in (("w_bits", recipe.w_bits), ("a_bits", recipe.a_bits), ("mask_token_id", recipe.mask_token_id)):
        given = options.get(name)
        if given is not None and value is not None and given != value:
            raise ValueError(f"starquant: option {name}={given} contradicts the recipe, which was calibrated with {name}={value}")
        settings[name] = value if value is not None else given
    recipe_head = recipe.options.get("quantize_head")
    given_head = options.get("quantize_head")
    if recipe_head is not None and given_head is not None and bool(given_head) != bool(recipe_head):
        if recipe_head:
            raise ValueError("starquant: the recipe quantizes the LM head; option quantize_head=False contradicts it")
        raise ValueError(
            "starquant: option quantize_head=True contradicts the recipe, which was calibrated without the LM "
            "head; calibrate with quantize_head=True to quantize it"
        )
    settings["quantize_head"] = bool(recipe_head if recipe_head is not None else given_head)
    return settings
