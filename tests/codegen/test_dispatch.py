"""``stq_compiler.codegen.dispatch``: the ``stq`` ops' CUDA kernels registered with the dispatcher
directly. No GPU is needed: fake CUDA tensors reach the dispatcher's keys as real ones would
(``test_dispatch_cuda.py`` calls the ops on a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from stq_compiler import fused_ops, ops  # noqa: F401 - importing them registers the CUDA kernels


@pytest.mark.parametrize("op", ["fused_quantize", "fused_linear", "quantize_per_token", "quantized_linear"])
def test_cuda_kernels_sit_at_the_cuda_and_autograd_cuda_keys(op):
    for key in ("CUDA", "AutogradCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stq::{op}", key)


def test_ops_on_fake_cuda_tensors_reach_their_fake_kernels():
    # Dynamo and AOTAutograd trace with fake tensors: their mode (the Python key, below autograd)
    # must answer, not the CUDA kernel
    with FakeTensorMode():
        x = torch.empty(17, 256, device="cuda", dtype=torch.float16)
        w = torch.empty(256, device="cuda")
        q, scale, zero = torch.ops.stq.fused_quantize(x, 4, w, 1e-5)
        assert (q.shape, scale.shape, zero.shape, q.device.type) == ((17, 128), (17, 1), (17, 1), "cuda")
        q8, s8, z8 = torch.ops.stq.quantize_per_token(x, 8)
        assert q8.shape == (17, 256) and q8.dtype == torch.int8


def test_inputs_that_need_a_gradient_are_refused():
    with FakeTensorMode():
        x = torch.empty(17, 256, device="cuda", dtype=torch.float16)
        w = torch.empty(256, device="cuda").requires_grad_(True)
        with pytest.raises(RuntimeError, match="stq::fused_quantize has no gradient"):
            torch.ops.stq.fused_quantize(x, 4, w, 1e-5)
        with torch.no_grad():
            torch.ops.stq.fused_quantize(x, 4, w, 1e-5)
