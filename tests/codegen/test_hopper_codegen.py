"""The fused kernels compiled for Hopper (sm_90a) on this CPU machine: the key variants use the
tensor cores' wgmma, are software-pipelined and do not spill registers. A fusion or layout change
that silently falls off the fast path shows up here before anyone runs a GPU."""

from __future__ import annotations

import os

import pytest

from stq_compiler.codegen import gluon_w4, hopper_codegen, triton_fused
from stq_compiler.fused_ops import FusedQuantizeSpec

pytestmark = [
    pytest.mark.skipif(not hopper_codegen.available(), reason="this Triton cannot compile for sm_90a here"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="kernels are interpreted"),
]


def _config(block_m, block_n, block_k, num_warps, num_stages, configs=None):
    for c in configs if configs is not None else triton_fused.gemm_configs():
        kw = c.kwargs
        if (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_warps, c.num_stages) == (block_m, block_n, block_k, num_warps, num_stages):
            return c
    raise LookupError("not an autotuning configuration")


@pytest.mark.parametrize("a_packed,b_packed,swiglu,config", [
    (True, True, False, (128, 128, 128, 8, 4)),  # W4A4, the large-M workhorse
    (True, True, True, (128, 64, 128, 8, 4)),  # W4A4 gate/up with SwiGLU
], ids=["w4a4-packed", "w4a4-packed-swiglu"])
def test_gemm_runs_on_wgmma_pipelined_without_spills(a_packed, b_packed, swiglu, config):
    r = hopper_codegen.gemm_variant(_config(*config), a_packed, b_packed, swiglu)
    print(r.row())
    assert r.uses_wgmma and "IGMMA" in r.mma
    assert r.async_copies > 0  # loads pipelined through shared memory
    assert r.spill_bytes == 0
    assert r.shared_bytes <= hopper_codegen.SM90_MAX_SHARED


@pytest.mark.parametrize("swiglu,config", [
    (False, (256, 128, 128, 8, 3)),  # the H200's pick for LLaDA-8B's linears
    (False, (128, 128, 128, 4, 4)),
    (True, (128, 128, 128, 8, 3)),  # gate/up with SwiGLU
    (False, (16, 128, 128, 4, 4)),  # a few tokens
], ids=["256x128", "128x128", "swiglu", "few-tokens"])
def test_w4_gemm_reads_the_unpacked_weight_from_registers(swiglu, config):
    # the point of the transposed W4 kernel: the unpacked weight feeds wgmma from registers
    r = hopper_codegen.w4_gemm_variant(_config(*config, configs=triton_fused.w4_gemm_configs()), swiglu)
    print(r.row())
    assert r.uses_wgmma and "IGMMA" in r.mma
    assert r.register_a
    assert r.async_copies > 0
    assert r.spill_bytes == 0
    assert r.shared_bytes <= hopper_codegen.SM90_MAX_SHARED


def test_every_w4_configuration_compiles_without_spills():
    for swiglu in (False, True):
        for c in triton_fused.w4_gemm_configs():
            if swiglu and not triton_fused.w4_swiglu_fits(c):
                continue
            for blocked in (False, True) if c.kwargs["BLOCK_K"] == triton_fused.BLOCKED_STEP else (False,):
                r = hopper_codegen.w4_gemm_variant(c, swiglu, blocked=blocked)
                assert r.spill_bytes == 0 and r.uses_wgmma, r.row()


@pytest.mark.skipif(gluon_w4.gluon is None, reason="this Triton has no Gluon")
@pytest.mark.parametrize("blocked", [True, False], ids=["blocked-weight", "pair-weight"])
@pytest.mark.parametrize("residual,bias,swiglu", [(True, False, False), (False, True, False), (False, False, False),
                                                  (False, True, True)], ids=["residual", "bias", "plain", "swiglu"])
@pytest.mark.parametrize("config", gluon_w4.configs(), ids=lambda c: "x".join(map(str, c)))
def test_w4_gluon_gemm_keeps_wgmma_in_flight_without_spills(config, residual, bias, swiglu, blocked):
    # the point of the Gluon kernel: the register-operand wgmma stays asynchronous; ptxas
    # serializing it (C7515) or the epilogue spilling would undo that silently
    r = hopper_codegen.w4_gluon_variant(config, residual, bias, blocked, swiglu)
    print(r.row())
    assert r.uses_wgmma and "IGMMA" in r.mma
    assert r.register_a
    assert not r.wgmma_serialized
    assert r.async_copies > 0  # TMA loads
    assert r.spill_bytes == 0
    assert r.shared_bytes <= hopper_codegen.SM90_MAX_SHARED


def test_fused_quantize_kron_on_tensor_cores_without_spills():
    # LLaDA-8B's q/k/v site: RMSNorm + 64x64 Kronecker + gate + 4-bit pack
    spec = FusedQuantizeSpec(4096, 4, rms_norm=True, kron=(64, 64), gate=True)
    r = hopper_codegen.quantize_variant(spec)
    print(r.row())
    assert r.uses_wgmma  # bf16x3 dots: HGMMA (the "ieee" FMA path spills ~10 KB)
    assert r.spill_bytes == 0
    assert r.shared_bytes <= hopper_codegen.SM90_MAX_SHARED


@pytest.mark.parametrize("split,presplit", [(True, True), (False, True), (False, False)],
                         ids=["row-blocks", "padded", "padded-split-in-kernel"])
def test_fused_quantize_one_token_a_program_on_tensor_cores(monkeypatch, split, presplit):
    # LLaDA-8B's MLP down site: 96 x 128 Kronecker, one token a program, its 96 rows as 64 + 32
    # (_token_kron_split_kernel with 32-row blocks, which Triton's Hopper bug keeps from running
    # there: MIN_SPLIT_BLOCK = 64 leaves LLaDA-8B's rows padded; every product a warpgroup MMA,
    # capped at 128 registers for two programs a multiprocessor, factors split on the host: under
    # 16 bytes of spills) or padded to 128 (_token_kron_quantize_kernel). Padded with the factors
    # split on the host (production): their splits in shared memory leave one program a
    # multiprocessor, so uncapped, 188 registers and no spills; splitting them in the kernel,
    # capped at 128 (TOKEN_KRON_MAXNREG until the host splits): ~300 bytes of spills, two programs
    # a multiprocessor. 4 and 16 warps spilled kilobytes and ran 2-3x slower
    # (results/explore-down-site-h200.json).
    monkeypatch.setattr(triton_fused, "SPLIT_TOKEN_ROWS", split)
    monkeypatch.setattr(triton_fused, "MIN_SPLIT_BLOCK", 32)  # the 32-row block (the Hopper bug's width)
    monkeypatch.setattr(triton_fused, "TOKEN_KRON_PRESPLIT", presplit)
    if not presplit:
        monkeypatch.setattr(triton_fused, "TOKEN_KRON_MAXNREG", 128)
    spec = FusedQuantizeSpec(12288, 4, kron=(96, 128), gate=True, pack=False)
    r = hopper_codegen.quantize_variant(spec, m=1024)
    print(r.row())
    assert ("tile=1x128x(64+32)" if split else "tile=1x128x128") in r.name
    assert r.uses_wgmma and (not split or r.mma == ["HGMMA"])  # no mma.sync for the 32-row block
    if split or not presplit:
        assert r.registers <= 128 and 2 * r.shared_bytes <= hopper_codegen.SM90_MAX_SHARED  # two programs an SM
        assert r.spill_bytes <= (128 if split else 512)
    else:
        assert r.spill_bytes == 0
    assert r.shared_bytes <= hopper_codegen.SM90_MAX_SHARED


@pytest.mark.parametrize("kernel", ["column-blocks", "chunks-presplit", "chunks"])
def test_dream_down_site_on_tensor_cores(monkeypatch, kernel):
    # Dream-7B's MLP down site: 128 x 148, its 148 columns as 128 + 64 in one token's tile
    # (_token_kron_split_kernel, production since 2026-11-29: 251 registers and no spills at 8 warps, one
    # program a multiprocessor, every dot at least 64 wide), or, too large for the padded
    # 128 x 256 tile (P2 alone 256 KB), 64 columns of the second factor at a time
    # (_chunk_kron_quantize_kernel; with its factors split on the host: 199 registers, no spills,
    # 96 KB of shared memory; split in the kernel: 255 and 68 bytes of spills, 64 KB)
    monkeypatch.setattr(triton_fused, "SPLIT_TOKEN_ROWS", kernel == "column-blocks")
    monkeypatch.setattr(triton_fused, "CHUNK_KRON_PRESPLIT", kernel != "chunks")
    spec = FusedQuantizeSpec(18944, 4, kron=(128, 148), gate=True, pack=False)
    r = hopper_codegen.quantize_variant(spec, m=1024)
    print(r.row())
    assert ("tile=1x128x(128+64)" if kernel == "column-blocks" else "chunks=128x64x3") in r.name
    assert r.uses_wgmma and r.mma == ["HGMMA"]
    assert r.spill_bytes <= (96 if kernel == "chunks" else 0)
    assert r.shared_bytes <= hopper_codegen.SM90_MAX_SHARED
