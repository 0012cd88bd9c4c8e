"""The pass pipeline: analyse a captured graph, run the passes in order, record each step.

Shared by the backend (``torch.compile``) and by ``stq inspect``, so both see the same passes.
Around each pass the pipeline measures what changed (nodes added and removed, bytes of the
buffers the pass registered, time) into the pass's ``PassReport.details``, logs it (logger
``stq_compiler.pipeline``, see ``stq_compiler.logs``), and hands the graph to an
``inspect.ArtifactWriter`` (the backend's ``debug_dir``; ``stq inspect --dump``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from stq_compiler import logs, release  # noqa: F401  (logs: applies STQ_LOGS once, on import of stq_compiler)
from stq_compiler.analysis import GraphAnalysis, analyze, norm_scale_feeding
from stq_compiler.inspect import ArtifactWriter, format_table, pass_row
from stq_compiler.ops import QuantizedWeight
from stq_compiler.options import BackendOptions
from stq_compiler.passes import PassReport, count_nodes
from stq_compiler.passes.quantize_linears import eligible, quantize_linears, site_key
from stq_compiler.passes.token_state import insert_token_state
from stq_compiler.site_transform import SiteTransform

log = logging.getLogger(__name__)


@dataclass
class RecipePlan:
    """What a recipe asks of one captured graph: per-site transforms, precomputed weights, TAC."""

    transforms: dict[str, SiteTransform] = field(default_factory=dict)
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    tac: dict = field(default_factory=dict)

    @property
    def needs_state(self) -> bool:
        return any(t.has_gates for t in self.transforms.values())


@dataclass
class PipelineResult:
    gm: fx.GraphModule
    analysis: GraphAnalysis
    reports: list[PassReport] = field(default_factory=list)
    plan: RecipePlan = field(default_factory=RecipePlan)


def plan_from_recipe(recipe, analysis: GraphAnalysis, quantize_head: bool) -> RecipePlan:
    """Read the recipe's tensors for the sites, linears and attention cores of this graph.

    Refuses a recipe made for another model (parameter names and shapes), and one that lacks a
    transform for a site of this graph when its method transforms every site."""
    from stq_compiler.calibration.tac import TacParams
    from stq_compiler.recipe import RecipeMismatchError, fingerprint_from_bindings

    recipe.check_fits(fingerprint_from_bindings(analysis.bindings), subset=True)
    plan = RecipePlan()
    fold_norm = bool(recipe.options.get("fold_norm"))
    for site in analysis.sites:
        if not all(eligible(lin, quantize_head) for lin in site.linears):
            continue
        key = site_key(site)
        tensors = {k[len("site."):]: v for k, v in recipe.for_parameter(key).items() if k.startswith("site.")}
        if tensors:
            feeds_norm = norm_scale_feeding(site.input, analysis.bindings) is not None
            plan.transforms[key] = SiteTransform.from_tensors(tensors, fold_norm=fold_norm and feeds_norm)
        elif recipe.method != "rtn":
            raise RecipeMismatchError(f"starquant: the {recipe.method} recipe has no transform for site {site.name} ({key})")
        for lin in site.linears:
            stored = recipe.for_parameter(lin.fqn)
            if "w.q" in stored:
                q = stored["w.q"]
                plan.weights[lin.fqn] = QuantizedWeight(q, stored["w.scale"], q.sum(1, dtype=torch.int32), recipe.w_bits)
    for core in analysis.attention:
        proj = core.output_projection
        stored = recipe.for_parameter(proj.fqn) if proj is not None else {}
        if "tac.M" in stored:
            plan.tac[proj.fqn] = TacParams(stored["tac.M"], stored["tac.d"])
    return plan


def _buffer_bytes(gm: fx.GraphModule) -> dict[str, int]:
    return {name: b.numel() * b.element_size() for name, b in gm.named_buffers()}


class _Steps:
    """Runs the passes of one graph: measures, logs and records each one."""

    def __init__(self, result: PipelineResult, writer: ArtifactWriter):
        self.result, self.writer = result, writer

    def captured(self, seconds: float) -> None:
        gm, analysis = self.result.gm, self.result.analysis
        n = count_nodes(gm)
        details = {
            "summary": analysis.summary(),
            "linears_found": len(analysis.linears),
            "sites": len(analysis.sites),
            "nodes_added": n,
            "nodes_removed": 0,
            "folded_bytes": 0,
            "seconds": seconds,
        }
        self.result.reports.append(PassReport("capture", 0, n, details))
        log.info("starquant: captured graph: %s", analysis.summary())
        self.writer.after_pass(gm, self.result.reports, header=f"# {analysis.summary()}\n")

    def run(self, run_pass: Callable, *args, **kwargs) -> PassReport:
        """``run_pass(gm, *args, **kwargs) -> (gm, report)`` on the current graph."""
        gm = self.result.gm
        nodes, buffers = set(gm.graph.nodes), _buffer_bytes(gm)
        start = time.perf_counter()
        gm, report = run_pass(gm, *args, **kwargs)
        seconds = time.perf_counter() - start
        after = set(gm.graph.nodes)
        report.details.update(
            nodes_added=len(after - nodes),
            nodes_removed=len(nodes - after),
            folded_bytes=sum(n for name, n in _buffer_bytes(gm).items() if name not in buffers),
            seconds=seconds,
        )
        self.result.gm = gm
        self.result.reports.append(report)
        d = report.details
        counts = ", ".join(f"{k} {d[k]}" for k in ("linears_quantized", "sites", "state_consumers", "tac_nodes") if k in d)
        log.info(
            "starquant: %s: +%d -%d nodes (%d now)%s, %d bytes folded, %.1f ms",
            report.name, d["nodes_added"], d["nodes_removed"], report.nodes_after,
            f", {counts}" if counts else "", d["folded_bytes"], seconds * 1e3,
        )
        self.writer.after_pass(gm, self.result.reports)
        return report


def _log_sites(analysis: GraphAnalysis, plan: RecipePlan, opts: BackendOptions) -> None:
    if not log.isEnabledFor(logging.DEBUG):
        return
    for site in analysis.sites:
        chosen = [lin for lin in site.linears if opts.quantize and eligible(lin, opts.quantize_head)]
        transform = plan.transforms.get(site_key(site))
        how = f"W{opts.w_bits}A{opts.a_bits} {'recipe transform' if transform else 'rtn'}" if chosen else "16-bit"
        log.debug("starquant: site %s (%s): %d linear(s), %s", site.name, site.role, len(site.linears), how)


def run_passes(
    gm: fx.GraphModule, example_inputs: list, opts: BackendOptions, writer: Optional[ArtifactWriter] = None
) -> PipelineResult:
    """Analyse ``gm`` and run the passes ``opts`` asks for; ``writer`` (default: one for
    ``opts.debug_dir``) records each step."""
    if writer is None:
        writer = ArtifactWriter(opts.debug_dir)
    start = time.perf_counter()
    analysis = analyze(gm, example_inputs)
    release.check_not_released(analysis.bindings)
    result = PipelineResult(gm, analysis)
    steps = _Steps(result, writer)
    steps.captured(time.perf_counter() - start)

    plan = plan_from_recipe(opts.recipe, analysis, opts.quantize_head) if opts.recipe is not None else RecipePlan()
    result.plan = plan
    _log_sites(analysis, plan, opts)
    if plan.needs_state and opts.token_state == "off":
        raise ValueError("starquant: the recipe gates activations by token state; token_state='off' contradicts it")
    state = None
    wants_state = opts.token_state == "required" or plan.needs_state or (
        opts.token_state == "auto" and opts.mask_token_id is not None and analysis.state_source is not None
    )
    if wants_state:
        steps.run(insert_token_state, analysis.state_source, opts.mask_token_id)
        state = result.gm.meta["stq_token_state"]

    if plan.tac:
        from stq_compiler.passes.tac import insert_tac

        steps.run(insert_tac, analysis, plan.tac)

    if opts.quantize:
        steps.run(
            quantize_linears, analysis, opts.w_bits, opts.a_bits, state, opts.quantize_head, plan.transforms, plan.weights
        )
        if opts.fuse_for(b.tensor for b in analysis.bindings.values()):
            from stq_compiler.passes.fuse import fuse_quantized_sites

            steps.run(fuse_quantized_sites, swiglu_epilogue=opts.swiglu_epilogue)
    if opts.quantize_embedding:
        from stq_compiler.passes.quantize_embedding import quantize_embedding

        steps.run(quantize_embedding, analysis)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("starquant: passes of this graph:\n%s", format_table([pass_row(r) for r in result.reports]))
    return result
