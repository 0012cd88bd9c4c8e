"""The ``starquant`` torch.compile backend.

``torch.compile(model, backend="starquant", options={...})`` reaches :func:`starquant` through
the ``torch_dynamo_backends`` entry point (no import needed). Dynamo calls it once per captured
graph (each side of a graph break is its own graph): the passes rewrite it
(``stq_compiler.pipeline``) and Inductor compiles the result.

Quantized graphs are for inference: they are compiled and run without autograd.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.fx as fx

from stq_compiler.options import BackendOptions
from stq_compiler.pipeline import run_passes


def starquant(gm: fx.GraphModule, example_inputs: list, mode: Optional[str] = None, options: Optional[dict] = None):
    """Dynamo backend: rewrite ``gm`` with the STaR-Quant passes, then compile it with Inductor."""
    opts = BackendOptions.from_dict(options)
    with torch.no_grad():
        result = run_passes(gm, example_inputs, opts)
        gm = result.gm
        if opts.inductor:
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            patches = {**(list_mode_options(mode) if mode else {}), **opts.inductor_config}
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
        else:
            compiled = gm.forward
    if not opts.quantize:
        return compiled

    @functools.wraps(compiled)
    def run_without_autograd(*args):
        with torch.no_grad():
            return compiled(*args)

    return run_without_autograd
