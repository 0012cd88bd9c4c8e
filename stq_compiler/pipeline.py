"""The pass pipeline: analyse a captured graph, run the passes in order, dump each step on request.

Shared by the backend (``torch.compile``) and by inspection tools, so both see the same passes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.fx as fx

from stq_compiler.analysis import GraphAnalysis, analyze, norm_scale_feeding
from stq_compiler.ops import QuantizedWeight
from stq_compiler.options import BackendOptions
from stq_compiler.passes import PassReport, count_nodes
from stq_compiler.passes.quantize_linears import eligible, quantize_linears, site_key
from stq_compiler.passes.token_state import insert_token_state
from stq_compiler.site_transform import SiteTransform

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


@dataclass
class RecipePlan:
    """What a recipe asks of one captured graph: per-site transforms, precomputed weights, TAC."""

    transforms: dict[str, SiteTransform] = field(default_factory=dict)
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    tac: dict = field(default_factory=dict)

    @property
    def needs_state(self) -> bool:
        return any(t.has_gates for t in self.transforms.values())


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

    plan = plan_from_recipe(opts.recipe, analysis, opts.quantize_head) if opts.recipe is not None else RecipePlan()
    if plan.needs_state and opts.token_state == "off":
        raise ValueError("starquant: the recipe gates activations by token state; token_state='off' contradicts it")
    state = None
    wants_state = opts.token_state == "required" or plan.needs_state or (
        opts.token_state == "auto" and opts.mask_token_id is not None and analysis.state_source is not None
    )
    if wants_state:
        start = time.perf_counter()
        gm, report = insert_token_state(gm, analysis.state_source, opts.mask_token_id)
        report.details["seconds"] = time.perf_counter() - start
        state = gm.meta["stq_token_state"]
        result.reports.append(report)
        dump(gm, report.name)

    if plan.tac:
        from stq_compiler.passes.tac import insert_tac

        start = time.perf_counter()
        gm, report = insert_tac(gm, analysis, plan.tac)
        report.details["seconds"] = time.perf_counter() - start
        result.reports.append(report)
        dump(gm, report.name)

    if opts.quantize:
        start = time.perf_counter()
        gm, report = quantize_linears(
            gm, analysis, opts.w_bits, opts.a_bits, state, opts.quantize_head, plan.transforms, plan.weights
        )
        report.details["seconds"] = time.perf_counter() - start
        result.reports.append(report)
        log.info("starquant: %s", report.details)
        dump(gm, report.name)
    result.gm = gm
    return result
