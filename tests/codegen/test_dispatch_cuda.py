"""The ``stq`` ops registered with the dispatcher directly (``stq_compiler.codegen.dispatch``), on a
GPU: inputs that need a gradient are refused, and under ``no_grad`` or ``inference_mode`` the op
gives the launcher's bits (that the compiled models run the launchers is ``test_ops_dispatch_to_*``
in the kernel test files).

Run on a GPU machine: ``pytest -m cuda tests/codegen/test_dispatch_cuda.py -s``."""

from __future__ import annotations

import os

import pytest
import torch

from stq_compiler.codegen import triton_fused

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") == "1", reason="TRITON_INTERPRET=1: kernels would be interpreted"
    ),
]


def test_ops_refuse_inputs_that_need_a_gradient_and_run_the_launcher_without():
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16, generator=gen)
    w = torch.rand(256, device="cuda", generator=gen).add_(0.5).requires_grad_(True)
    with pytest.raises(RuntimeError, match="no gradient"):
        torch.ops.stq.fused_quantize(x, 4, w, 1e-5)
    want = triton_fused.fused_quantize_triton(x, 4, w.detach(), 1e-5)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got = torch.ops.stq.fused_quantize(x, 4, w, 1e-5)
        for g, e in zip(got, want):
            assert torch.equal(g, e)
