"""Giving back the float weights a starquant-compiled model no longer reads.

The backend folds and quantizes each weight once, at compile time, into buffers of the compiled
graph (``passes/quantize_linears.py``, ``passes/fuse.py``, ``passes/quantize_embedding.py``). The
model's float parameters stay bound to the graph's inputs, and the model keeps them: as compiled,
a 4-bit model still holds its float16 weights too. :func:`release_float_weights` frees the
storage of those nothing reads any more, which is where the memory saving comes from::

    fast = torch.compile(model, backend="starquant", options={"recipe": "llada-w4a4.stq"})
    fast(ids)                                   # compiles (each input shape once)
    freed = stq_compiler.release_float_weights(model)

The backend records, for every graph it compiles, which bound parameters and buffers the
rewritten graph reads, for as long as Dynamo keeps that compiled graph. A tensor is released only
when some live compiled graph holds it as an unread input and none reads it, and only when every
tensor of the model sharing its storage is releasable too. Its storage is resized to zero bytes: shape, strides, dtype and device stay, so
Dynamo's guards still hold and the compiled graphs keep running (they never touch it).

After that the float model is gone: the model cannot run eagerly, and a new graph (another input
shape, a recompile after a guard fails) needs the float weights to quantize them. The backend
refuses that compile with an error naming the released tensor, rather than quantize a weight it
cannot read. Warm up every shape you need (``dynamic=False``) before releasing.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn


@dataclass
class _Graph:
    """What one compiled graph does with the model tensors bound to its inputs; it counts while
    the compiled callable (``owner``) lives, i.e. until Dynamo drops it (``torch._dynamo.reset()``)."""

    owner: weakref.ref
    read: dict  # id(tensor) -> weakref to it
    unread: dict  # id(tensor) -> (weakref to it, fqn)


_graphs: list[_Graph] = []
_released: dict[int, tuple[weakref.ref, str]] = {}  # id(tensor) -> (weakref to it, fqn)


def _alive(entry_ref: weakref.ref, tensor: torch.Tensor) -> bool:
    return entry_ref() is tensor  # ids are reused once a tensor is gone


def graph_usage(bindings, gm: torch.fx.GraphModule) -> tuple[dict, dict]:
    """(read, unread) model tensors of the rewritten graph ``gm``: bound to its placeholders, with
    and without readers. Attributes of the graph module are left out: the module keeps those."""
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    read, unread = {}, {}
    for node, binding in bindings.items():
        if node.op != "placeholder":
            continue
        final = placeholders.get(node.name)
        if final is not None and final.users:
            read[id(binding.tensor)] = weakref.ref(binding.tensor)
        else:
            unread[id(binding.tensor)] = (weakref.ref(binding.tensor), binding.fqn)
    return read, unread


def record_graph(usage: tuple[dict, dict], owner) -> None:
    """Register a compiled graph's ``graph_usage`` for as long as ``owner`` (the callable the
    backend returns to Dynamo) lives; called by the backend."""
    _graphs[:] = [g for g in _graphs if g.owner() is not None]
    for key in [k for k, (ref, _) in _released.items() if ref() is None]:
        del _released[key]
    _graphs.append(_Graph(weakref.ref(owner), *usage))


def check_not_released(bindings) -> None:
    """Refuse to compile a graph bound to a tensor that ``release_float_weights`` gave back."""
    for binding in bindings.values():
        released = _released.get(id(binding.tensor))
        if released is not None and _alive(released[0], binding.tensor):
            raise RuntimeError(
                f"starquant: {binding.fqn} was given back by release_float_weights(); compiling a new graph "
                "(another input shape, or a recompile) needs the float weights. Reload the model, or call every "
                "input shape once before releasing (torch.compile(..., dynamic=False))."
            )


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def _model_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    seen = set()
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(t) not in seen:
            seen.add(id(t))
            yield name, t


def releasable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model's float parameters and buffers that a live compiled graph holds
    unread and none reads, whose storage no other tensor of the model needs."""
    live = [g for g in _graphs if g.owner() is not None]
    read = {key for g in live for key, ref in g.read.items() if ref() is not None}
    unread = {key: ref for g in live for key, (ref, _) in g.unread.items() if key not in read}
    by_storage: dict[tuple[str, int], list[tuple[str, torch.Tensor, bool]]] = {}
    for name, t in _model_tensors(model):
        if t.untyped_storage().nbytes() == 0:
            continue
        ok = t.is_floating_point() and id(t) in unread and _alive(unread[id(t)], t)
        by_storage.setdefault(_storage_key(t), []).append((name, t, ok))
    return [(name, t) for group in by_storage.values() if all(ok for _, _, ok in group) for name, t, _ in group]


def _fqn_of(t: torch.Tensor) -> str:
    for g in _graphs:
        if id(t) in g.unread and _alive(g.unread[id(t)][0], t):
            return g.unread[id(t)][1]
    return "a model tensor"


@torch.no_grad()
def release_float_weights(model: nn.Module) -> int:
    """Free the storage of the float weights no starquant-compiled graph of ``model`` reads any
    more (see the module docstring); returns the bytes given back. Call it after the compiled
    model has run once per input shape."""
    freed = 0
    done = set()
    for _, t in releasable(model):
        key = _storage_key(t)
        if key not in done:
            done.add(key)
            freed += t.untyped_storage().nbytes()
            t.untyped_storage().resize_(0)
        _released[id(t)] = (weakref.ref(t), _fqn_of(t))
    return freed
