"""Streamed (block-by-block) calibration: the graph's cut into pieces, and recipes equal to the
whole-graph calibration it replaced (kept here, only as the reference)."""

import pytest
import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from stq_compiler.analysis import analyze
from stq_compiler.calibration import calibrate as calibrate_module
from stq_compiler.calibration.calibrate import (
    _activation_node,
    _blocks,
    _fit_site,
    _gptq_weights,
    _Graph,
    _quantize_fitted,
    _weights_on,
    calibrate,
    capture_model,
)
from stq_compiler.calibration.stream import BoundaryStream, extract_piece
from stq_compiler.calibration.tac import TacStatistics, tac_group_size
from stq_compiler.passes.quantize_linears import site_key
from tests.conftest import ARCHS, logits_of, tiny_model

SMALL = {"epochs": 2, "trajectory_prompts": 1, "trajectory_steps": 4, "progress": False}


def _captured(arch):
    model = tiny_model(arch, seed=3)
    ids = torch.randint(0, 255, (4, 16), generator=torch.Generator().manual_seed(1))
    captured = capture_model(model, ids, torch.device("cpu"))
    analysis = analyze(captured.gm, captured.example_inputs)
    captured.partition(_blocks(analysis, False), analysis.bindings)
    return model, ids, captured


@pytest.mark.parametrize("arch", ARCHS)
def test_pieces_are_the_blocks_and_only_the_residual_stream_crosses_between_them(arch):
    model, _, captured = _captured(arch)
    config = model.config
    assert captured.pieces == getattr(config, "num_hidden_layers", None) or config.n_layers
    # piece 0 hands on what every block reads (rotary tables, masks) and the residual stream;
    # every later piece hands on one tensor: the residual stream
    assert all(len(outputs) == 1 for outputs in captured.outputs[1:-1]), captured.outputs
    assert captured.outputs[-1] == []


@pytest.mark.parametrize("arch", ARCHS)
def test_pieces_chained_compute_the_model(arch):
    model, ids, captured = _captured(arch)
    with torch.no_grad():
        ref = logits_of(model(ids))
    gm = captured.gm
    output = next(n for n in gm.graph.nodes if n.op == "output")
    (logits,) = [n for n in tree_leaves(output.args) if isinstance(n, fx.Node) and n.meta["example_value"].shape == ref.shape]
    stream = BoundaryStream([ids], captured.ids_index, torch.device("cpu"), captured.last_reader)
    for index in range(captured.pieces - 1):
        stream.run(extract_piece(gm, index, captured.outputs[index]), captured.example_inputs, advance=True)
    last = extract_piece(gm, captured.pieces - 1, [logits.name])
    args = [stream.values[name][0] for name in last.boundary]
    args += [ids if j == captured.ids_index else captured.example_inputs[j] for j in last.inputs]
    with torch.no_grad():
        (out,) = last.module(*args)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# The whole-graph calibration the streamed one replaced: for block b, the whole graph with every
# earlier block quantized, observers at block b's sites, all batches; TAC from the whole graph,
# layer by layer.


def _run_whole(graph, ids):
    args = list(graph.captured.example_inputs)
    args[graph.captured.ids_index] = ids
    with torch.no_grad():
        graph.gm(*args)


def _fit_blocks_whole_graph(captured, blocks, batches, cfg, quantize_head, gen, timing):
    transforms, weights, reports, fitted = {}, {}, {}, set()
    fold_norm = cfg.recipe_options()["fold_norm"]
    state = torch.cat([b.reshape(-1) == cfg.mask_token_id for b in batches])
    for keys in blocks:
        graph = _Graph(captured, cfg.mask_token_id)
        _quantize_fitted(graph, fitted, transforms, weights, cfg, quantize_head)
        sites = {site_key(s): s for s in graph.analysis.sites if site_key(s) in keys}
        nodes, norms = {}, {}
        for key, site in sites.items():
            nodes[key], norms[key] = _activation_node(site, fold_norm, graph.analysis.bindings)
        seen = graph.observe(nodes)
        for batch in batches:
            _run_whole(graph, batch)
        for key, site in sites.items():
            x = torch.cat(seen[key])
            transform, reports[key] = _fit_site(site, x, state, norms[key], cfg, gen)
            if transform is not None:
                transforms[key] = transform
            if cfg.gptq:
                weights.update(_gptq_weights(site, transform, x, state, norms[key], cfg.w_bits))
            fitted.add(key)
    return transforms, weights, reports


def _fit_tac_whole_graph(captured, transforms, weights, batches, cfg, quantize_head, kept=None):
    """Layer by layer on the whole graph: layer i's TAC from the reference graph and the quantized
    graph with the TAC of layers before i in place (with ``tac_select``, the tokens paired)."""
    from stq_compiler.passes.tac import insert_tac

    fitted = {}
    order = [c.output_projection.fqn for c in _Graph(captured, cfg.mask_token_id).analysis.attention if c.output_projection]
    for fqn in order:
        stats, waiting = None, []
        for side, quantize in (("ref", False), ("q", True)):
            graph = _Graph(captured, cfg.mask_token_id)
            if quantize and fitted:
                insert_tac(graph.gm, graph.analysis, dict(fitted))
            proj = next(c.output_projection for c in graph.analysis.attention if c.output_projection and c.output_projection.fqn == fqn)
            stats = stats or TacStatistics(proj.in_features, tac_group_size(proj.in_features))
            _quantize_fitted(graph, {site_key(s) for s in graph.analysis.sites}, transforms, weights, cfg, quantize_head, quantize)
            if cfg.tac_select:
                sink = (lambda z: waiting.append(z)) if side == "ref" else (lambda z: stats.update(waiting.pop(0), z))
            else:
                sink = lambda z, side=side: stats.add(side, z)  # noqa: E731
            graph.observe({fqn: proj.input}, {fqn: sink})
            for batch in batches[: max(1, cfg.tac_samples // cfg.batch_size)]:
                _run_whole(graph, batch)
        fitted[fqn] = stats.fit()
        if cfg.tac_select:
            fitted[fqn], keep = stats.keep_where_better(fitted[fqn])
            if kept is not None:
                kept[fqn] = keep.tolist()
    return fitted


@pytest.mark.parametrize("arch,method,options", [
    ("llada", "starquant", {}),
    ("dream", "starquant", {}),
    ("llama", "starquant", {"tac_samples": 4}),
    ("llada", "starquant", {"tac_select": True, "sgat_select": False}),
    ("qwen2", "starquant", {"sgat": False}),
    ("llada", "rtn", {"gptq": True}),
    ("dream", "quarot", {"gptq": True}),
])
def test_streamed_recipes_equal_the_whole_graph_ones(arch, method, options, monkeypatch):
    model = tiny_model(arch, seed=3)
    ids = torch.randint(0, 255, (8, 16), generator=torch.Generator().manual_seed(1))
    streamed = calibrate(model, ids, method, 4, 4, **SMALL, **options)
    monkeypatch.setattr(calibrate_module, "_fit_blocks", _fit_blocks_whole_graph)
    monkeypatch.setattr(calibrate_module, "fit_tac_layers", _fit_tac_whole_graph)
    whole = calibrate(model, ids, method, 4, 4, **SMALL, **options)
    assert streamed.tensors.keys() == whole.tensors.keys()
    assert streamed.tensors  # the comparison compares something
    for key, tensor in whole.tensors.items():
        torch.testing.assert_close(streamed.tensors[key], tensor, rtol=1e-5, atol=1e-5, msg=key)
    assert streamed.options["sgat_loss" if method == "starquant" else "gptq"] == whole.options["sgat_loss" if method == "starquant" else "gptq"]
    assert streamed.options.get("tac_kept") == whole.options.get("tac_kept")


@pytest.mark.parametrize("arch", ["llada", "llama"])
def test_pieces_compute_on_another_device_with_the_weights_on_the_host(arch):
    """The weights stay on the CPU; each piece moves its own to the device (here ``meta``, which
    stands in for a GPU: a tensor left behind on the CPU would raise a device mismatch)."""
    model = tiny_model(arch, seed=3)
    ids = torch.randint(0, 255, (4, 16))
    captured = capture_model(model, ids, torch.device("meta"))
    analysis = analyze(captured.gm, captured.example_inputs)
    captured.partition(_blocks(analysis, False), analysis.bindings)
    stream = BoundaryStream([ids], captured.ids_index, torch.device("meta"), captured.last_reader)
    for index in range(captured.pieces - 1):
        inputs = captured.inputs_on_device(index)
        stream.run(extract_piece(captured.gm, index, captured.outputs[index]), inputs, advance=True)
        assert all(t.device.type == "meta" for v in stream.values.values() for t in tree_leaves(v) if isinstance(t, torch.Tensor))
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_a_model_with_its_weights_on_the_host_runs_on_the_device(arch):
    model = tiny_model(arch, seed=3)
    ids = torch.randint(0, 255, (2, 16))
    with torch.no_grad(), _weights_on(model, torch.device("meta")):
        out = logits_of(model(ids.to("meta")))
    assert out.device.type == "meta" and out.shape == (2, 16, model.config.vocab_size)
    assert all(p.device.type == "cpu" for p in model.parameters())
