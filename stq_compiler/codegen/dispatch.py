"""Registering a custom op's CUDA kernel with the dispatcher, without custom_op's Python layers.

Without CUDA graphs (``mode="default"``) a quantized step waits for the host: a W4A4 LLaDA-8B step
calls 288 ``stq`` ops, and on the H200's host each cost 190-380 µs before its kernel was queued
(``benchmarks/explore/host_overhead.py``), 60-100 µs of it in the layers
``op.register_kernel("cuda")`` puts before the kernel. ``register_cuda`` registers it directly.
"""

from __future__ import annotations

import torch

_LIBRARIES: dict[str, torch.library.Library] = {}


def register_cuda(op, fn) -> None:
    """Run ``fn`` for ``op`` (a ``torch.library.custom_op``) on CUDA tensors.

    ``op.register_kernel("cuda")`` would put two Python layers before ``fn`` on every call,
    custom_op's autograd kernel (which redispatches below autograd) and its backend wrapper
    (which checks the outputs for aliasing): 60-100 µs a call on the H200's host. ``fn`` is
    registered with the dispatcher directly instead, at the CUDA key, and the AutogradCUDA kernel
    only refuses inputs that need a gradient (the ops have none; custom_op would fail later, at
    backward) and calls the op again below autograd, where a fake or functional tensor's mode
    (the Python key, below autograd) still gets its turn before CUDA."""
    namespace, name = op._qualname.split("::")
    library = _LIBRARIES.get(namespace)
    if library is None:
        library = _LIBRARIES[namespace] = torch.library.Library(namespace, "IMPL")
    overload = getattr(getattr(torch.ops, namespace), name).default

    def autograd_cuda(*args, **kwargs):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                           for a in (*args, *kwargs.values())):
            raise RuntimeError(f"{op._qualname} has no gradient: call the quantized model under torch.no_grad() "
                               "or torch.inference_mode(), or with inputs that do not require grad")
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args, **kwargs)

    library.impl(name, fn, "CUDA")
    library.impl(name, autograd_cuda, "AutogradCUDA")
