"""verify: the invariants every pass must leave a graph in, checked on the graph alone.

``verify_graph(gm, example_inputs=None, *, state_node=None, mask_token_id=None)`` returns the
problems it finds, one readable line each (``[]``: the graph is sound); ``assert_valid`` raises
``GraphInvariantError`` listing all of them. What is checked:

* **well formed**: ``gm.graph.lint()`` passes; def-use links agree both ways; the graph, as a
  networkx DiGraph of its data edges, is acyclic.
* **no dangling nodes**: every node but placeholders and the output has users, except nodes with
  side effects (impure ops, calls that compute nothing), calibration observers, and the state
  node, which the token-state pass leaves for later passes to read.
* **one token state**: at most one ``eq(input_ids, mask_id)`` in the graph; the state node (given,
  or ``gm.meta["stq_token_state"]``) is that node, in the graph, comparing against
  ``mask_token_id`` when given; every state-conditioned node (``stq.quantize_per_token`` with
  ``is_masked`` or state gates, ``torch.where`` on a token state) consumes that very node.
* **each quantized weight folded once**: each ``stq.quantized_linear`` reads its codes, scales and
  sums from get_attr buffers named for its own linear that no other linear reads; its
  ``meta["stq_linear"]["fqn"]`` appears on no other quantized linear; the buffers agree with each
  other (int8 codes within the bit width, ``w_sum`` their row sums, one scale per row) and, with
  example inputs, with the shape of the float weight they replace.
* **shapes propagate** (with example inputs): ``FakeTensorProp`` runs the graph on fake tensors,
  and every node's propagated shape and dtype match the ``example_value`` Dynamo recorded.
  The graph's node metadata is left as it was found.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx

from stq_compiler.capture import bind_tensors, get_attr_value
from stq_compiler.passes.quantize_linears import buffer_name
from stq_compiler.passes.token_state import STATE_META_KEY

QUANTIZE_OP = "stq.quantize_per_token.default"
LINEAR_OP = "stq.quantized_linear.default"

_EQ_FUNCTIONS = {torch.eq, operator.eq}
_WHERE_FUNCTIONS = {torch.where}
# Calls kept for their effect although nothing reads their (None) result.
_SIDE_EFFECT_FUNCTIONS = {torch._C._log_api_usage_once, torch._C._set_grad_enabled}
# Ops through which a boolean state stays "the same state" (broadcast views, casts).
_STATE_VIEWS = {"unsqueeze", "reshape", "view", "expand", "to", "bool", "contiguous", "flatten"}


class GraphInvariantError(RuntimeError):
    """A graph that breaks an invariant of ``verify_graph``; the message lists every problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} graph invariant(s) broken:\n{lines}")


def verify_graph(
    gm: fx.GraphModule,
    example_inputs: Optional[list] = None,
    *,
    state_node: Optional[fx.Node] = None,
    mask_token_id: Optional[int] = None,
) -> list[str]:
    """Every invariant ``gm`` breaks, one line each; ``[]`` when it is sound (see the module docstring)."""
    problems = _well_formed(gm)
    well_formed = not problems
    state = state_node if state_node is not None else gm.meta.get(STATE_META_KEY)
    problems += _dangling(gm, state)
    problems += _token_state(gm, state, mask_token_id)
    problems += _quantized_weights(gm, example_inputs)
    if example_inputs is not None and well_formed:  # propagating a broken graph says nothing new
        problems += _shapes(gm, example_inputs)
    return problems


def assert_valid(
    gm: fx.GraphModule,
    example_inputs: Optional[list] = None,
    *,
    state_node: Optional[fx.Node] = None,
    mask_token_id: Optional[int] = None,
) -> None:
    """``verify_graph``, raising ``GraphInvariantError`` with all problems when there is any."""
    problems = verify_graph(gm, example_inputs, state_node=state_node, mask_token_id=mask_token_id)
    if problems:
        raise GraphInvariantError(problems)


# ---------------------------------------------------------------------------------------------
# structure


def _well_formed(gm: fx.GraphModule) -> list[str]:
    problems = []
    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises RuntimeError, AssertionError, ... with a good message
        first_line = (str(exc).strip().splitlines() or [""])[0]  # the rest is a dump of the graph
        problems.append(f"lint: {type(exc).__name__}: {first_line}")
    nodes = list(gm.graph.nodes)
    dag = nx.DiGraph()
    dag.add_nodes_from(nodes)
    for node in nodes:
        for inp in node.all_input_nodes:
            dag.add_edge(inp, node)
            if node not in inp.users:
                problems.append(f"def-use: {node.name} reads {inp.name}, which does not list it as a user")
        for user in node.users:
            if node not in user.all_input_nodes:
                problems.append(f"def-use: {node.name} lists {user.name} as a user, which does not read it")
    if not nx.is_directed_acyclic_graph(dag):
        cycle = nx.find_cycle(dag)
        problems.append("cycle: " + " -> ".join(edge[0].name for edge in cycle) + f" -> {cycle[0][0].name}")
    return problems


def _has_side_effect(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _SIDE_EFFECT_FUNCTIONS:
        return True
    if "example_value" in node.meta and node.meta["example_value"] is None and node.op != "get_attr":
        return True  # Dynamo recorded that it returns nothing: it runs for its effect
    try:
        return node.is_impure()
    except Exception:  # is_impure looks the module up; a broken target is reported by lint
        return False


def _is_observer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A call of a calibration observer module (it records its input and returns nothing)."""
    if node.op != "call_module":
        return False
    try:
        module = gm.get_submodule(str(node.target))
    except AttributeError:
        return False
    return type(module).__name__.endswith("Observer")


def _dangling(gm: fx.GraphModule, state: Optional[fx.Node]) -> list[str]:
    # The state node is the token-state pass's product for later passes: unread until they run.
    return [
        f"dangling: {node.name} ({node.op} {_target_name(node)}) has no users"
        for node in gm.graph.nodes
        if node.op not in ("placeholder", "output")
        and not node.users
        and node is not state
        and not _is_observer(gm, node)
        and not _has_side_effect(gm, node)
    ]


def _target_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


# ---------------------------------------------------------------------------------------------
# the token state


def _is_state_comparison(node: fx.Node) -> bool:
    """``eq(input, int)``: a graph input compared with one token id (the token-state pattern)."""
    is_eq = (node.op == "call_function" and node.target in _EQ_FUNCTIONS) or (node.op == "call_method" and node.target == "eq")
    if not is_eq or len(node.args) != 2:
        return False
    a, b = node.args
    return (isinstance(a, fx.Node) and a.op == "placeholder" and isinstance(b, int)) or (
        isinstance(b, fx.Node) and b.op == "placeholder" and isinstance(a, int)
    )


def _compared_id(node: fx.Node) -> int:
    return next(a for a in node.args if isinstance(a, int))


def _state_source(node) -> Optional[fx.Node]:
    """The node a boolean condition comes from, through broadcast views and casts."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _STATE_VIEWS and node.args:
        node = node.args[0]
    return node if isinstance(node, fx.Node) else None


def _quantizer_state(node: fx.Node) -> tuple[Optional[object], bool]:
    """(the ``is_masked`` argument, whether the quantizer has state gates) of a quantize_per_token."""
    names = ("x", "bits", "is_masked", "gate_masked", "gate_unmasked")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound.get("is_masked"), bound.get("gate_masked") is not None or bound.get("gate_unmasked") is not None


def _token_state(gm: fx.GraphModule, state: Optional[fx.Node], mask_token_id: Optional[int]) -> list[str]:
    problems = []
    nodes = list(gm.graph.nodes)
    comparisons = [n for n in nodes if _is_state_comparison(n)]
    if len(comparisons) > 1:
        problems.append(
            f"token state: {len(comparisons)} eq(input_ids, mask) nodes ({', '.join(n.name for n in comparisons)}); "
            "the graph must compute the state once"
        )
    present = state is not None and state.graph is gm.graph and state in set(nodes)
    if state is not None:
        if not present:
            problems.append(f"token state: the state node {state.name} is not a node of this graph (erased?)")
        elif not _is_state_comparison(state):
            problems.append(f"token state: the state node {state.name} is not eq(input_ids, mask id) but {state.op} {_target_name(state)}")
        elif mask_token_id is not None and _compared_id(state) != mask_token_id:
            problems.append(f"token state: {state.name} compares with token id {_compared_id(state)}, not the mask id {mask_token_id}")

    def expect_state(node: fx.Node, reads, what: str) -> None:
        if state is None:
            problems.append(f"token state: {node.name} is conditioned on the state ({what}) but the graph records no state node")
        elif reads is not state:
            name = reads.name if isinstance(reads, fx.Node) else repr(reads)
            problems.append(f"token state: {node.name} reads {name} as its {what}, not the state node {state.name}")
        elif not present:
            problems.append(f"token state: {node.name} reads the erased state node {state.name} as its {what}")

    for node in nodes:
        if node.op == "call_function" and str(node.target) == QUANTIZE_OP:
            is_masked, gated = _quantizer_state(node)
            if gated and is_masked is None:
                problems.append(f"token state: quantizer {node.name} has state gates but no is_masked input")
            elif is_masked is not None:
                expect_state(node, is_masked, "is_masked")
        elif node.op == "call_function" and node.target in _WHERE_FUNCTIONS and node.args:
            source = _state_source(node.args[0])
            if source is not None and (source is state or _is_state_comparison(source)):
                expect_state(node, source, "condition")
    return problems


# ---------------------------------------------------------------------------------------------
# quantized weights


def _quantized_weights(gm: fx.GraphModule, example_inputs: Optional[list]) -> list[str]:
    problems = []
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == LINEAR_OP]
    if not linears:
        return problems
    float_weights = _float_weights(gm, example_inputs) if example_inputs is not None else {}
    fqns: Counter = Counter()
    readers: dict[str, list[str]] = {}
    for node in linears:
        info = node.meta.get("stq_linear") or {}
        fqn = info.get("fqn")
        if not fqn:
            problems.append(f"quantized weight: {node.name} has no meta['stq_linear']['fqn']")
        else:
            fqns[fqn] += 1
        buffers = {}
        for index, what in ((3, "codes"), (4, "scales"), (5, "sums")):
            arg = node.args[index] if len(node.args) > index else None
            if not isinstance(arg, fx.Node) or arg.op != "get_attr":
                kind = f"{arg.op} {arg.name}" if isinstance(arg, fx.Node) else repr(arg)
                problems.append(f"quantized weight: {node.name} reads its weight {what} from {kind}, not a get_attr buffer")
                continue
            readers.setdefault(arg.target, []).append(node.name)
            if fqn and not arg.target.startswith(buffer_name(fqn, "w")):
                problems.append(f"quantized weight: {node.name} ({fqn}) reads {what} buffer {arg.target}, which belongs to another weight")
            value = get_attr_value(gm, arg.target)
            if not isinstance(value, torch.Tensor):
                problems.append(f"quantized weight: {node.name} reads {arg.target}, which is no tensor of the module")
            else:
                buffers[what] = value
        if len(buffers) == 3:
            problems += _weight_buffers_agree(node, fqn, info.get("w_bits"), buffers, float_weights.get(fqn))
    problems += [f"quantized weight: {fqn} is quantized by {n} quantized linears, not once" for fqn, n in sorted(fqns.items()) if n > 1]
    problems += [
        f"quantized weight: buffer {target} is read by {len(names)} quantized linears ({', '.join(names)})"
        for target, names in sorted(readers.items())
        if len(names) > 1
    ]
    return problems


def _weight_buffers_agree(node, fqn, w_bits, buffers, float_weight) -> list[str]:
    q, scale, w_sum = buffers["codes"], buffers["scales"], buffers["sums"]
    where = f"quantized weight: {node.name} ({fqn})"
    if q.dtype != torch.int8 or q.dim() != 2:
        return [f"{where}: codes must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}"]
    problems = []
    n = q.shape[0]
    if scale.shape != (n,) or w_sum.shape != (n,):
        problems.append(f"{where}: {n} rows of codes but scales {tuple(scale.shape)} and sums {tuple(w_sum.shape)}")
    elif not torch.equal(w_sum.to(torch.int64), q.to(torch.int64).sum(1)):
        problems.append(f"{where}: the weight sums are not the row sums of its codes")
    if isinstance(w_bits, int) and 1 < w_bits <= 8 and q.numel() and q.to(torch.int16).abs().max().item() > (1 << (w_bits - 1)) - 1:
        problems.append(f"{where}: codes exceed the {w_bits}-bit range")
    if float_weight is not None and tuple(q.shape) not in (tuple(float_weight.shape), tuple(float_weight.shape)[::-1]):
        problems.append(f"{where}: codes {tuple(q.shape)} do not fit the float weight {tuple(float_weight.shape)}")
    return problems


def _float_weights(gm: fx.GraphModule, example_inputs: list) -> dict[str, torch.Tensor]:
    try:
        return {b.fqn: b.tensor for b in bind_tensors(gm, example_inputs).values()}
    except Exception:
        return {}


# ---------------------------------------------------------------------------------------------
# shapes


def _shapes(gm: fx.GraphModule, example_inputs: list) -> list[str]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return [f"shapes: the graph takes {len(placeholders)} inputs but {len(example_inputs)} example inputs were given"]
    saved = {n: n.meta["val"] for n in gm.graph.nodes if "val" in n.meta}
    current: list[Optional[fx.Node]] = [None]

    class _Prop(FakeTensorProp):
        def run_node(self, n):
            current[0] = n
            return super().run_node(n)

    problems = []
    try:
        with torch.no_grad():
            _Prop(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
        for node in gm.graph.nodes:
            recorded, propagated = node.meta.get("example_value"), node.meta.get("val")
            if isinstance(recorded, torch.Tensor) and isinstance(propagated, torch.Tensor):
                if _static(recorded.shape) and _static(propagated.shape) and (
                    tuple(recorded.shape) != tuple(propagated.shape) or recorded.dtype != propagated.dtype
                ):
                    problems.append(
                        f"shapes: {node.name} was {tuple(recorded.shape)} {recorded.dtype} when captured but "
                        f"propagates as {tuple(propagated.shape)} {propagated.dtype}"
                    )
    except Exception as exc:
        at = current[0].name if current[0] is not None else "?"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        problems.append(f"shapes: propagation fails at {at}: {type(exc).__name__}: {message}")
    finally:
        for node in gm.graph.nodes:
            if node in saved:
                node.meta["val"] = saved[node]
            else:
                node.meta.pop("val", None)
    return problems


def _static(shape) -> bool:
    return all(isinstance(d, int) for d in shape)
