"""The pass pipeline: analyse a captured graph, run the passes in order, dump each step on request.

Shared by the backend (``torch.compile``) and by inspection tools, so both see the same passes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.fx as fx

from stq_compiler.analysis import GraphAnalysis, analyze
from stq_compiler.options import BackendOptions
from stq_compiler.passes import PassReport, count_nodes
from stq_compiler.passes.quantize_linears import quantize_linears
from stq_compiler.passes.token_state import insert_token_state

log = logging.getLogger("stq_compiler")


@dataclass
class PipelineResult:
    gm: fx.GraphModule
    analysis: GraphAnalysis
    reports: list[PassReport] = field(default_factory=list)


class _Dumper:
    """Writes the readable graph after each pass to ``debug_dir/graph_<n>/<k>_<pass>.py``."""

    def __init__(self, debug_dir: Optional[str]):
        self.root = None
        if debug_dir:
            base = Path(debug_dir)
            base.mkdir(parents=True, exist_ok=True)
            n = len(list(base.glob("graph_*")))
            self.root = base / f"graph_{n}"
            self.root.mkdir()
        self.step = 0

    def __call__(self, gm: fx.GraphModule, name: str, extra: str = "") -> None:
        if self.root is None:
            return
        text = gm.print_readable(print_output=False)
        (self.root / f"{self.step:02d}_{name}.py").write_text(extra + text)
        self.step += 1


def run_passes(gm: fx.GraphModule, example_inputs: list, opts: BackendOptions) -> PipelineResult:
    dump = _Dumper(opts.debug_dir)
    start = time.perf_counter()
    analysis = analyze(gm, example_inputs)
    result = PipelineResult(gm, analysis)
    captured = PassReport("capture", count_nodes(gm), count_nodes(gm), {"summary": analysis.summary()})
    captured.details["seconds"] = time.perf_counter() - start
    result.reports.append(captured)
    log.info("starquant: captured graph: %s", analysis.summary())
    dump(gm, "captured", f"# {analysis.summary()}\n")

    state = None
    wants_state = opts.token_state == "required" or (
        opts.token_state == "auto" and opts.mask_token_id is not None and analysis.state_source is not None
    )
    if wants_state:
        start = time.perf_counter()
        gm, report = insert_token_state(gm, analysis.state_source, opts.mask_token_id)
        report.details["seconds"] = time.perf_counter() - start
        state = gm.meta["stq_token_state"]
        result.reports.append(report)
        dump(gm, report.name)

    if opts.quantize:
        start = time.perf_counter()
        gm, report = quantize_linears(gm, analysis, opts.w_bits, opts.a_bits, state, opts.quantize_head)
        report.details["seconds"] = time.perf_counter() - start
        result.reports.append(report)
        log.info("starquant: %s", report.details)
        dump(gm, report.name)
    result.gm = gm
    return result
