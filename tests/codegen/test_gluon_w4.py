"""The Gluon W4 GEMM's host side on the CPU: when fused_linear may run it, and which tile it takes.
(The kernel itself runs only on Hopper: ``test_fused_kernels_cuda.py`` checks it against the
reference there, ``test_hopper_codegen.py`` compiles it for sm_90a here.)"""

from __future__ import annotations

import pytest
import torch

from stq_compiler.codegen import gluon_w4

BIG, SMALL = gluon_w4.configs()


def test_cpu_tensors_never_take_the_gluon_kernel():
    # on the CPU fused_linear runs the Triton kernel under the interpreter, or the reference
    a = torch.zeros(1024, 4096, dtype=torch.int8)
    w = torch.zeros(4096, 2048, dtype=torch.uint8)
    assert not gluon_w4.supports(a, w)


@pytest.mark.parametrize("m,n,want", [
    # LLaDA-8B's linears (N: q/k/v 12288, o 4096, gate/up 24576, down 4096) on 132 multiprocessors
    (1024, 4096, BIG),  # 128 large tiles: one wave, full
    (512, 4096, SMALL),  # 64 large tiles leave half the GPU idle; 128 small ones do not
    (256, 4096, SMALL),
    (512, 12288, SMALL),  # 192 large tiles: two waves, the second half empty; 384 small: three
    (512, 24576, BIG),  # 384 large tiles: three full-ish waves
    (256, 12288, BIG),  # 96 large tiles: one wave; 192 small ones need two
    (4096, 4096, BIG),
])
def test_config_for_takes_the_tile_whose_waves_end_first(monkeypatch, m, n, want):
    monkeypatch.setattr(gluon_w4, "_multiprocessors", lambda device_index: 132)
    assert gluon_w4.config_for(m, n, 0) == want
