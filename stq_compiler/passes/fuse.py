"""fuse_quantized_sites: each site's quantizer and its prologue into ``stq.fused_quantize``, each
quantized linear and its epilogue into ``stq.fused_linear``, with 4-bit weight codes packed two a
byte (``pack_int4_blocks``: blocks of 128 codes, each byte holding a code of each half) and 4-bit
activation codes one a byte (``pack=False``).

Expects: a graph after ``quantize_linears`` (and optionally ``insert_token_state``,
``insert_tac``): per site ``stq.quantize_per_token(act, bits, ...)``, its three outputs read by
``stq.quantized_linear`` nodes whose weight codes, scales and sums are ``get_attr`` buffers.

Leaves, per site, one ``stq.fused_quantize(x, bits, ...)`` that absorbed the chain feeding the
quantizer, walking back from it as far as each node has no other reader, in the op's order
(norm → TAC → smoothing → Kronecker):

* ``stq.kron_transform(a, P1, P2)``;
* smoothing ``a * inv_smooth`` (a 1-D constant of the site's width);
* ``stq.tac_block_affine(z, M, d)``;
* an RMSNorm ``[w *] cast(h * rsqrt(mean(h**2, -1, keepdim=True) + eps))`` with ``h = cast(x)``
  (LLaDA's and transformers' Llama/Qwen2 norms), the weight when it was not folded into W.

and per linear one ``stq.fused_linear`` on packed weights (4-bit: ``pack_int4_blocks``, new buffers;
the int8 ones are dropped), with the epilogue it can take:

* a site's linears without an epilogue (q/k/v) become one GEMM over their stacked weights,
  its output split back (``torch.split`` along the last dimension);
* SwiGLU (with ``swiglu_epilogue=True``; by default gate and up are stacked like q/k/v): ``silu(gate) * up``
  where gate and up are linears of one site becomes one GEMM over the concatenated weight [gate; up];
* residual: ``r + linear`` (either order) of one shape and dtype becomes the GEMM's residual add.

The fused ops compute in float32 from the site's input on, so on a float32 model the fused
graph computes what the unfused one did, bit for bit (on CPU, where both run the reference
ops); on a bfloat16 model it skips the roundings to bfloat16 between the fused stages.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

import stq_compiler.tac_ops  # noqa: F401  (registers stq::tac_block_affine)
from stq_compiler.fused_ops import pack_int4_blocks  # importing it registers the fused ops
from stq_compiler.passes import PassReport, count_nodes, register_constant

QUANTIZE = torch.ops.stq.quantize_per_token.default
LINEAR = torch.ops.stq.quantized_linear.default
KRON = torch.ops.stq.kron_transform.default
TAC = torch.ops.stq.tac_block_affine.default
FUSED_QUANTIZE = torch.ops.stq.fused_quantize.default
FUSED_LINEAR = torch.ops.stq.fused_linear.default

_MUL = {operator.mul, torch.mul}
_ADD = {operator.add, torch.add}
_SILU = {F.silu, torch.nn.functional.silu}
_CASTS = {"to", "float", "half", "bfloat16", "type"}


def _calls(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _method(node, name) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def _value(gm: fx.GraphModule, node):
    """The tensor a node stands for at compile time (a buffer, or a traced example), or None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return getattr(gm, node.target, None)
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _vector_of(gm, node, width) -> bool:
    v = _value(gm, node)
    return v is not None and v.dim() == 1 and v.shape[0] == width


def _strip_casts(node):
    while _method(node, "to") or (isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CASTS):
        node = node.args[0]
    return node


def _is_cast(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CASTS


def _match_rms_norm(top):
    """``top = cast(h * rsqrt(mean(h**2, -1, keepdim=True) + eps))`` with ``h = [cast](x)``:
    (x, eps, the pattern's nodes from ``top`` back), or None. Every node below ``top`` must be
    read by the pattern only (the caller checks ``top``'s readers)."""
    chain, n = [], top
    while _is_cast(n):
        chain.append(n)
        n = n.args[0]
    if not (_calls(n, _MUL) and len(n.args) == 2):
        return None
    for h, r in (n.args, n.args[::-1]):
        if not (_calls(r, {torch.rsqrt}) and _calls(r.args[0], _ADD) and len(r.args[0].args) == 2):
            continue
        add = r.args[0]
        mean, eps = add.args if isinstance(add.args[1], float) else add.args[::-1]
        if not (isinstance(eps, float) and _method(mean, "mean")):
            continue
        dims = tuple(mean.args[1:]) or (mean.kwargs.get("dim"),)
        if dims not in ((-1,), ([-1],), ((-1,),)) or not mean.kwargs.get("keepdim", False):
            continue
        sq = mean.args[0]
        if not (_method(sq, "pow") and tuple(sq.args[1:]) == (2,) and sq.args[0] is h):
            continue
        nodes = [*chain, n, r, add, mean, sq]
        if any(len(node.users) != 1 for node in nodes[1:]):
            return None
        if _is_cast(h) and set(h.users) == {sq, n}:  # the cast to float32 goes too
            return h.args[0], eps, [*nodes, h]
        return h, eps, nodes
    return None


def _absorb_prologue(gm, act: fx.Node, quantize: fx.Node, width: int):
    """Walk back from the quantizer's input; returns (input node, fused_quantize kwargs, absorbed
    nodes from the quantizer back, stage names)."""
    kwargs, absorbed, stages = {}, [], []
    reader = quantize

    def take(node, stage):
        nonlocal reader
        absorbed.append(node)
        stages.append(stage)
        reader = node

    if _calls(act, {KRON}) and _only_user(act, reader):
        kwargs["p1"], kwargs["p2"] = act.args[1], act.args[2]
        take(act, "kron")
        act = act.args[0]
    if _calls(act, _MUL) and len(act.args) == 2 and _only_user(act, reader):
        for x, s in (act.args, act.args[::-1]):
            if isinstance(x, fx.Node) and isinstance(s, fx.Node) and s.op == "get_attr" and _vector_of(gm, s, width):
                kwargs["inv_smooth"] = s
                take(act, "smooth")
                act = x
                break
    if _calls(act, {TAC}) and _only_user(act, reader):
        kwargs["tac_m"], kwargs["tac_d"] = act.args[1], act.args[2]
        take(act, "tac")
        act = act.args[0]
    # RMSNorm, with its weight when one multiplies it here
    if _calls(act, _MUL) and len(act.args) == 2 and _only_user(act, reader):
        for w, n in (act.args, act.args[::-1]):
            if not (_vector_of(gm, w, width) and isinstance(n, fx.Node) and _only_user(n, act)):
                continue
            match = _match_rms_norm(n)
            if match is not None:
                kwargs["norm_weight"] = w
                take(act, "norm_weight")
                act = n
                break
    if isinstance(act, fx.Node) and _only_user(act, reader):
        match = _match_rms_norm(act)
        if match is not None:
            x, eps, nodes = match
            absorbed.extend(nodes)
            kwargs["rms_eps"] = eps
            stages.append("rms_norm")
            act = x
    return act, kwargs, absorbed, stages


def _packed_weight(gm, node: fx.Node, w_bits: int, graph) -> fx.Node:
    """The weight codes as the fused GEMM reads them: packed two a byte for 4 bits (blocked)."""
    if w_bits != 4:
        return node
    name = node.target + "_packed"
    return _constant(gm, name, None if hasattr(gm, name) else pack_int4_blocks(getattr(gm, node.target)), graph)


def _constant(gm, name, tensor, graph) -> fx.Node:
    if not hasattr(gm, name):
        register_constant(gm, name, tensor)
    return graph.get_attr(name)


def _residual_epilogue(linear: fx.Node):
    """(add node, residual operand) when the linear's only reader adds a same-shape tensor."""
    if len(linear.users) != 1:
        return None
    add = next(iter(linear.users))
    if not (_calls(add, _ADD) and len(add.args) == 2 and not add.kwargs):
        return None
    other = add.args[1] if add.args[0] is linear else add.args[0]
    if other is linear or not isinstance(other, fx.Node):
        return None
    out, res = add.meta.get("example_value"), other.meta.get("example_value")
    out_dtype = linear.args[7]
    if not (isinstance(out, torch.Tensor) and isinstance(res, torch.Tensor)):
        return None
    if res.shape != out.shape or res.dtype != out_dtype or out.dtype != out_dtype:
        return None
    return add, other


def _swiglu_pairs(linears: list[fx.Node]):
    """(mul, gate linear, up linear) for ``silu(gate) * up`` among one site's linears."""
    pairs = []
    for gate in linears:
        if len(gate.users) != 1:
            continue
        silu = next(iter(gate.users))
        if not (_calls(silu, _SILU) and len(silu.users) == 1 and not silu.kwargs.get("inplace", False)):
            continue
        mul = next(iter(silu.users))
        if not (_calls(mul, _MUL) and len(mul.args) == 2):
            continue
        up = mul.args[1] if mul.args[0] is silu else mul.args[0]
        if up in linears and up is not gate and list(up.users) == [mul] and gate.args[7] == up.args[7]:
            pairs.append((mul, gate, up))
    return pairs


def _copy_value_meta(old: fx.Node, new: fx.Node) -> None:
    for key in ("example_value", "val"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def _concatenate(gm, graph, linears: list[fx.Node], old_weights: set) -> fx.Node:
    """One GEMM over the stacked weights of linears that read the same codes (q/k/v), its output
    split back along the last dimension: ``getitem(split(y, widths, -1), i)`` for linear i."""
    weights = [[getattr(gm, lin.args[i].target) for lin in linears] for i in (3, 4, 5)]
    widths = [w.shape[0] for w in weights[0]]
    w_bits = _w_bits(linears[0])
    wq = torch.cat(weights[0])
    prefix = linears[0].args[3].target + "_cat"
    first = min(linears, key=lambda n: list(graph.nodes).index(n))
    with graph.inserting_before(first):
        w_node = _constant(gm, prefix + ("_packed" if w_bits == 4 else ""), pack_int4_blocks(wq) if w_bits == 4 else wq, graph)
        s_node = _constant(gm, prefix + "_scale", torch.cat(weights[1]), graph)
        sum_node = _constant(gm, prefix + "_sum", torch.cat(weights[2]), graph)
        bias = None
        biases = [lin.args[6] for lin in linears]
        if any(b is not None for b in biases):
            parts = []
            for lin, b in zip(linears, biases):
                if b is None:
                    ref = next(x for x in biases if x is not None)
                    b = graph.call_function(torch.zeros, (getattr(gm, lin.args[4].target).shape[0],),
                                            {"dtype": _value(gm, ref).dtype if _value(gm, ref) is not None else torch.float32,
                                             "device": getattr(gm, lin.args[4].target).device})
                parts.append(b)
            bias = graph.call_function(torch.cat, (parts,))
        y = graph.call_function(FUSED_LINEAR, (*first.args[:3], w_node, s_node, sum_node, bias, None, False, first.args[7]))
        y.meta["stq_linear"] = {"epilogue": "none", "w_bits": w_bits,
                                "fqns": [lin.meta.get("stq_linear", {}).get("fqn") for lin in linears]}
        parts = graph.call_function(torch.split, (y, widths, -1))
        for i, lin in enumerate(linears):
            out = graph.call_function(operator.getitem, (parts, i))
            _copy_value_meta(lin, out)
            old_weights.update(lin.args[j].target for j in (3, 4, 5))
            lin.replace_all_uses_with(out)
    for lin in linears:
        graph.erase_node(lin)
    return y


def _w_bits(linear: fx.Node) -> int:
    return linear.meta.get("stq_linear", {}).get("w_bits", 8)


def _prepare_factor_splits(gm: fx.GraphModule, prologue: dict) -> None:
    """Split a site's CUDA Kronecker factors into bfloat16 hi + lo now, at compile time, for the
    activation kernels to read (``triton_fused.prepare_factor_splits``): made at the first call
    instead, under CUDA graphs they would be allocated in the graph's memory pool during the
    warm-up, which Inductor's CUDA-graph trees refuse."""
    factors = [getattr(gm, prologue[name].target) for name in ("p1", "p2")
               if isinstance(prologue.get(name), fx.Node) and prologue[name].op == "get_attr"]
    if any(f.is_cuda for f in factors):
        from stq_compiler.codegen import triton_fused

        triton_fused.prepare_factor_splits(*factors)


def fuse_quantized_sites(gm: fx.GraphModule, swiglu_epilogue: bool = False) -> tuple[fx.GraphModule, PassReport]:
    """``swiglu_epilogue``: gate/up become one GEMM with the SwiGLU in its epilogue. Off by
    default: on the H200 at LLaDA-8B's gate/up (4-bit weights, 1024 tokens) the Gluon W4 kernel
    with the SwiGLU epilogue takes 191 µs, the stacked GEMM and Inductor's SiLU·mul kernel 173 +
    16 µs (``benchmarks/results/fused-kernels-h200.json``), and the step as long (22.95 against
    22.82 ms); elsewhere the Triton SwiGLU kernel keeps two int32 accumulators and smaller tiles
    (396 µs against 256 µs for the stacked GEMM, before the Gluon kernel). Off, gate/up are
    stacked into one plain GEMM like q/k/v.

    The report's ``weight_bytes_freed``: the buffers nothing reads after the pass, given back
    (the int8 codes of 4-bit weights, now packed, and the codes, scales and weight sums of
    linears whose concatenation replaced them)."""
    report = PassReport("fuse_quantized_sites", nodes_before=count_nodes(gm))
    graph = gm.graph
    counts = {"sites_fused": 0, "linears_fused": 0, "concatenated": 0, "swiglu": 0, "residual": 0,
              "rms_norm": 0, "norm_weight": 0, "tac": 0, "smooth": 0, "kron": 0}
    old_weights = set()
    for quantize in [n for n in graph.nodes if _calls(n, {QUANTIZE})]:
        act, bits = quantize.args[0], quantize.args[1]
        extra = dict(quantize.kwargs)
        width = _value(gm, act).shape[-1] if _value(gm, act) is not None else None
        if width is None:  # the quantizer's input width from its gates or the weights it feeds
            readers = [u for g in quantize.users for u in g.users if _calls(u, {LINEAR})]
            width = getattr(gm, readers[0].args[3].target).shape[1] if readers else -1
        x, prologue, absorbed, stages = _absorb_prologue(gm, act, quantize, width)
        with graph.inserting_before(quantize):
            # 4-bit activation codes stay one a byte (pack=False): the W4 GEMM reads them straight
            # into shared memory for the MMA, while a packed tile would have to be unpacked in
            # registers and stored back (about 2x slower on the H200; triton_fused docstring).
            fused = graph.call_function(FUSED_QUANTIZE, (x, bits), {**prologue, **extra, "pack": False})
        fused.meta["stq_fused"] = {"stages": [*reversed(stages), "quantize"], "bits": bits}
        _prepare_factor_splits(gm, prologue)
        quantize.replace_all_uses_with(fused)
        graph.erase_node(quantize)
        for node in absorbed:  # from the quantizer back: each has no reader left
            graph.erase_node(node)
        counts["sites_fused"] += 1
        for s in stages:
            counts[s] += 1

        outputs = {g.args[1]: g for g in fused.users if _calls(g, {operator.getitem})}
        codes = outputs.get(0)
        linears = [u for u in (codes.users if codes is not None else []) if _calls(u, {LINEAR})]
        done = set()
        for mul, gate, up in (_swiglu_pairs(linears) if swiglu_epilogue else []):
            if gate in done or up in done:
                continue
            parts = [getattr(gm, lin.args[i].target) for lin in (gate, up) for i in (3, 4, 5)]
            wq, ws, wsum = (torch.cat([parts[i], parts[i + 3]]) for i in range(3))
            prefix = gate.args[3].target + "_swiglu"
            with graph.inserting_before(mul):
                w_node = _constant(gm, prefix + ("_packed" if _w_bits(gate) == 4 else ""),
                                   pack_int4_blocks(wq) if _w_bits(gate) == 4 else wq, graph)
                s_node = _constant(gm, prefix + "_scale", ws, graph)
                sum_node = _constant(gm, prefix + "_sum", wsum, graph)
                bias = None
                if gate.args[6] is not None or up.args[6] is not None:
                    present = gate.args[6] if gate.args[6] is not None else up.args[6]
                    b_parts = [lin.args[6] if lin.args[6] is not None else graph.call_function(torch.zeros_like, (present,))
                               for lin in (gate, up)]
                    bias = graph.call_function(torch.cat, (b_parts,))
                new = graph.call_function(FUSED_LINEAR, (*gate.args[:3], w_node, s_node, sum_node, bias, None, True, gate.args[7]))
            new.meta["stq_linear"] = {**gate.meta.get("stq_linear", {}), "epilogue": "swiglu",
                                      "fqns": [gate.meta.get("stq_linear", {}).get("fqn"), up.meta.get("stq_linear", {}).get("fqn")]}
            old_weights.update(lin.args[i].target for lin in (gate, up) for i in (3, 4, 5))
            _copy_value_meta(mul, new)
            mul.replace_all_uses_with(new)
            silu = next(iter(gate.users))
            for node in (mul, silu, gate, up):
                graph.erase_node(node)
            done.update((gate, up))
            counts["swiglu"] += 1
            counts["linears_fused"] += 2
        plain = [lin for lin in linears if lin not in done and _residual_epilogue(lin) is None]
        if len(plain) >= 2 and len({lin.args[7] for lin in plain}) == 1 and len({_w_bits(lin) for lin in plain}) == 1:
            _concatenate(gm, graph, plain, old_weights)
            done.update(plain)
            counts["concatenated"] += 1
            counts["linears_fused"] += len(plain)
        for lin in linears:
            if lin in done:
                continue
            residual = _residual_epilogue(lin)
            anchor = residual[0] if residual else lin
            with graph.inserting_before(anchor):
                w_node = _packed_weight(gm, lin.args[3], _w_bits(lin), graph)
                new = graph.call_function(
                    FUSED_LINEAR,
                    (*lin.args[:3], w_node, lin.args[4], lin.args[5], lin.args[6], residual[1] if residual else None, False, lin.args[7]),
                )
            new.meta["stq_linear"] = {**lin.meta.get("stq_linear", {}), "epilogue": "residual" if residual else "none"}
            # the new node computes what the node it replaces did: same shape and dtype
            _copy_value_meta(residual[0] if residual else lin, new)
            if residual:
                residual[0].replace_all_uses_with(new)
                graph.erase_node(residual[0])
                counts["residual"] += 1
            if _w_bits(lin) == 4:
                old_weights.add(lin.args[3].target)
            lin.replace_all_uses_with(new)
            graph.erase_node(lin)
            counts["linears_fused"] += 1

    # drop the int8 weight buffers nothing reads any more
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(node)
    still_read = {n.target for n in graph.nodes if n.op == "get_attr"}
    freed = 0
    for name in old_weights - still_read:
        if name in gm._buffers:
            freed += gm._buffers[name].numel() * gm._buffers[name].element_size()
            del gm._buffers[name]
            sources = getattr(gm, "_param_name_to_source", None)
            if sources is not None:
                sources.pop(name, None)
    graph.lint()
    gm.recompile()
    report.nodes_after = count_nodes(gm)
    report.details = {**counts, "weight_bytes_freed": freed}
    return gm, report
