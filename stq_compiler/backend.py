"""The ``starquant`` torch.compile backend.

``torch.compile(model, backend="starquant", options={...})`` reaches :func:`starquant` through
the ``torch_dynamo_backends`` entry point (no import needed). Dynamo calls it once per captured
graph (each side of a graph break is its own graph): the passes rewrite it
(``stq_compiler.pipeline``) and Inductor compiles the result.

``StarQuant(**options)`` is the same backend as an object that keeps each graph's pass reports,
for whoever wants to see what the passes did: ``torch.compile(model, backend=StarQuant(...))``.

Quantized graphs are for inference: they are compiled and run without autograd.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.fx as fx

from stq_compiler import release
from stq_compiler.options import BackendOptions
from stq_compiler.pipeline import PipelineResult, run_passes


def _compile(gm: fx.GraphModule, example_inputs: list, opts: BackendOptions, results: Optional[list]):
    with torch.no_grad():
        result = run_passes(gm, example_inputs, opts)
        usage = release.graph_usage(result.analysis.bindings, result.gm)
        if results is not None:
            results.append(result)
        if opts.inductor:
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            mode = opts.mode_for([b.tensor for b in result.analysis.bindings.values()] + list(example_inputs))
            patches = {**list_mode_options(mode), **opts.inductor_config}
            compiled = compile_fx(result.gm, example_inputs, config_patches=patches)
        else:
            compiled = result.gm.forward
    if not opts.inference_only:
        release.record_graph(usage, compiled)
        return compiled

    @functools.wraps(compiled)
    def run_without_autograd(*args):
        with torch.no_grad():
            return compiled(*args)

    release.record_graph(usage, run_without_autograd)  # what release_float_weights may give back
    return run_without_autograd


def _with_mode(options: Optional[dict], mode: Optional[str]) -> dict:
    """``options`` plus the compile mode given beside them (``torch.compile(mode=...)``,
    ``StarQuant(mode=...)``); the two must not disagree."""
    options = dict(options or {})
    if mode is not None:
        if options.get("mode") not in (None, mode):
            raise ValueError(f"starquant: mode={mode!r} contradicts option mode={options['mode']!r}")
        options["mode"] = mode
    return options


def starquant(gm: fx.GraphModule, example_inputs: list, mode: Optional[str] = None, options: Optional[dict] = None):
    """Dynamo backend: rewrite ``gm`` with the STaR-Quant passes, then compile it with Inductor."""
    return _compile(gm, example_inputs, BackendOptions.from_dict(_with_mode(options, mode)), None)


class StarQuant:
    """The starquant backend as an object; ``results`` holds one ``PipelineResult`` per graph."""

    def __init__(self, mode: Optional[str] = None, **options):
        self.options = BackendOptions.from_dict(_with_mode(options, mode))
        self.results: list[PipelineResult] = []

    @property
    def mode(self) -> Optional[str]:
        return self.options.mode

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        return _compile(gm, example_inputs, self.options, self.results)
