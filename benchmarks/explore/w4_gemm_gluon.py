"""Probe (GPU): the W4 GEMM (packed 4-bit weight x int8 activation codes, int32 accumulation)
written in Gluon, with the wgmma kept in flight while the next weight tile is unpacked.

Why: in ``triton_fused._w4_linear_kernel`` Triton waits for every wgmma before the next tile is
unpacked, because its Hopper pipeliner keeps a dot asynchronous only with a float32 accumulator
(``WGMMAPipeline.cpp``, rule 2.1) and ours is int32 (exact). ``w4_gemm_e4m3.py`` showed what the
overlap is worth: the same GEMM on fp8 (float32 accumulator, asynchronous) ran 25-30 % faster,
but fp8's reduced-precision accumulation is not exact once a partial sum passes about 2**14.
Gluon issues ``warpgroup_mma(is_async=True)`` and waits explicitly, whatever the accumulator.

(The production kernel, ``stq_compiler/codegen/gluon_w4.py``, keeps the existing packing and
joins the nibble planes in registers; this probe's layout was 15-20 % faster still.)

Layout: the weight is packed in blocks of 128 codes, byte j of a block holding code j (low
nibble) and code j + 64 (high nibble): the two nibble planes are then the two K halves of the
block, each already in the MMA's register-operand layout, and each multiplies one K half of the
activation tile in shared memory (a view, no copy). Tiles come in by TMA (out-of-bounds rows and
K zero-filled), ``STAGES`` deep.

    python benchmarks/explore/w4_gemm_gluon.py --out $OUT/w4-gluon.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# the production kernel's helpers (stq_compiler/codegen/gluon_w4.py, which grew out of this probe)
from stq_compiler.codegen.gluon_w4 import _instr_n, _issue, _nibbles, _warps_per_cta

DEV = "cuda"
GROUP = 128  # codes a packing block (64 bytes)
SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)}
# (BLOCK_N weight rows, BLOCK_M tokens, STAGES, warps)
CONFIGS = [(128, 256, 3, 8), (128, 256, 4, 8), (128, 128, 4, 4), (128, 128, 5, 4), (256, 128, 3, 8), (128, 128, 4, 8)]


def pack_halves(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> uint8 [N, 64 * ceil(K / 128)]: per block of 128 codes, byte j holds
    code j (low nibble) and code j + 64 (high nibble); K padded with zero codes."""
    n, k = codes.shape
    kp = -(-k // GROUP) * GROUP
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, kp - k)).reshape(n, kp // GROUP, 2, GROUP // 2)
    return ((c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)).reshape(n, kp // 2).to(torch.uint8)


@gluon.jit
def _step(i, w_desc, a_desc, w_smem, a_smem, ready, off_n, off_m, num_k, acc, w_regs: gl.constexpr):
    """One K step: wait for its tiles, unpack the weight, issue both halves' MMAs; once the
    previous step's MMAs are done, refill their stage with step i + STAGES - 1."""
    STAGES: gl.constexpr = w_smem.shape[0]
    HALF: gl.constexpr = w_smem.shape[2]
    s = i % STAGES
    mbarrier.wait(ready.index(s), (i // STAGES) & 1)
    lo, hi = _nibbles(w_smem.index(s).load(w_regs))
    a = a_smem.index(s)
    acc = warpgroup_mma(lo, a.slice(0, HALF, dim=1).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(hi, a.slice(HALF, HALF, dim=1).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=2, deps=(acc,))
    _issue(w_desc, a_desc, w_smem, a_smem, ready, i + STAGES - 1, off_n, off_m, i + STAGES - 1 < num_k)
    return acc


@gluon.jit
def _w4_gluon_kernel(w_desc, a_desc, y_ptr, M, N, K, stride_ym, GROUP_N: gl.constexpr, STAGES: gl.constexpr,
                     num_warps: gl.constexpr):
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    HALF: gl.constexpr = w_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    gl.static_assert(BLOCK_K == 2 * HALF)

    # grouped launch order: GROUP_N weight tiles share each activation tile while it is in L2
    pid = gl.program_id(0)
    num_n = gl.cdiv(N, BLOCK_N)
    num_m = gl.cdiv(M, BLOCK_M)
    per_group = GROUP_N * num_m
    first = (pid // per_group) * GROUP_N
    group = gl.minimum(num_n - first, GROUP_N)
    pid_n = first + (pid % per_group) % group
    pid_m = (pid % per_group) // group
    off_n = pid_n * BLOCK_N
    off_m = pid_m * BLOCK_M

    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, HALF], w_desc.layout)
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(ready.index(st), count=1)

    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=_warps_per_cta(BLOCK_N, num_warps),
        instr_shape=[16, _instr_n(BLOCK_N, BLOCK_M, num_warps), 32])
    w_regs: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)

    num_k = gl.cdiv(K, BLOCK_K)  # >= 1
    for pre in gl.static_range(STAGES - 1):
        _issue(w_desc, a_desc, w_smem, a_smem, ready, pre, off_n, off_m, pre < num_k)
    # step 0 outside the loop: an accumulator that could bypass the loop holding the zeros'
    # plain moves makes ptxas serialize every wgmma (C7515)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.int32, mma)
    acc = _step(0, w_desc, a_desc, w_smem, a_smem, ready, off_n, off_m, num_k, acc, w_regs)
    for i in range(1, num_k):
        acc = _step(i, w_desc, a_desc, w_smem, a_smem, ready, off_n, off_m, num_k, acc, w_regs)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(st))

    # [BLOCK_N, BLOCK_M] -> y[m, n]: threads along n for coalesced stores
    out: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, num_warps], [0, 1])
    y = gl.convert_layout(acc.to(gl.float32), out)
    offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out))
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out))
    ptrs = y_ptr + offs_m.to(gl.int64)[None, :] * stride_ym + offs_n[:, None]
    gl.store(ptrs, y, mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


def w4_gluon(xq, wh, k, cfg):
    """xq int8 [M, K] (K % 16 == 0), wh = pack_halves(w) -> float32 [M, N]."""
    bn, bm, stages, warps = cfg
    m, n = xq.shape[0], wh.shape[0]
    w_layout = gl.NVMMASharedLayout.get_default_for([bn, GROUP // 2], gl.uint8)
    a_layout = gl.NVMMASharedLayout.get_default_for([bm, GROUP], gl.int8)
    w_desc = TensorDescriptor(wh, list(wh.shape), list(wh.stride()), [bn, GROUP // 2], w_layout)
    a_desc = TensorDescriptor(xq, list(xq.shape), list(xq.stride()), [bm, GROUP], a_layout)
    y = torch.empty((m, n), dtype=torch.float32, device=xq.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _w4_gluon_kernel[grid](w_desc, a_desc, y, m, n, k, y.stride(0), GROUP_N=8, STAGES=stages, num_warps=warps)
    return y


def main():
    from triton.testing import do_bench_cudagraph

    from stq_compiler import fused_ops
    from stq_compiler.codegen import triton_fused

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="w4-gluon.json")
    args = ap.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    checks, rows = [], []
    for (m, k, n) in [(1024, 4096, 4096), (1000, 12288, 4000), (7, 4096, 512), (300, 18944, 520), (64, 3584, 1000), (33, 200, 72)]:
        for case in ("random", "extreme"):
            if case == "random":
                xq = torch.randint(-8, 8, (m, k), device=DEV, generator=gen).to(torch.int8)
                wq = torch.randint(-8, 8, (n, k), device=DEV, generator=gen).to(torch.int8)
            else:
                xq, wq = torch.full((m, k), -8, device=DEV, dtype=torch.int8), torch.full((n, k), -8, device=DEV, dtype=torch.int8)
            exact = (xq.double() @ wq.double().t()).float()
            for cfg in CONFIGS:
                try:
                    y = w4_gluon(xq, pack_halves(wq), k, cfg)
                    ok, err = bool(torch.equal(y, exact)), None
                except Exception as exc:  # noqa: BLE001 - a configuration that fails is reported
                    ok, err = False, f"{type(exc).__name__}: {str(exc)[:300]}"
                checks.append({"m": m, "k": k, "n": n, "case": case, "cfg": cfg, "exact": ok, "error": err})
                print(checks[-1], flush=True)
    for m in (1024, 4096):
        for name, (k, n) in SHAPES.items():
            xq = torch.randint(-8, 8, (m, k), device=DEV, dtype=torch.int8, generator=gen)
            wq = torch.randint(-8, 8, (n, k), device=DEV, dtype=torch.int8, generator=gen)
            wp, wh = fused_ops.pack_int4(wq.cpu()).to(DEV), pack_halves(wq)
            flops = 2.0 * m * n * k
            ones_m, ones_n = torch.ones(m, 1, device=DEV), torch.ones(n, device=DEV)
            zeros_m, w_sum = torch.zeros(m, 1, device=DEV, dtype=torch.int32), torch.zeros(n, device=DEV, dtype=torch.int32)
            x8 = xq.to(torch.float16).to(torch.float8_e4m3fn)
            wf8 = wq.to(torch.float16).to(torch.float8_e4m3fn)
            one = torch.ones((), device=DEV)
            kinds = [
                ("w4-int8 triton (production)", lambda: triton_fused.fused_linear_triton(
                    xq, ones_m, zeros_m, wp, ones_n, w_sum, None, None, False, torch.float32)),
                ("fp8 _scaled_mm (8-bit operands)", lambda: torch._scaled_mm(
                    x8, wf8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)),
            ] + [(f"w4-int8 gluon {cfg}", lambda cfg=cfg: w4_gluon(xq, wh, k, cfg)) for cfg in CONFIGS]
            for kind, fn in kinds:
                try:
                    fn()
                    us = do_bench_cudagraph(fn, rep=50) * 1e3
                except Exception as exc:  # noqa: BLE001
                    print(f"M={m} {name:8s} {kind:40s} FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                rows.append({"m": m, "linear": name, "kind": kind, "us": us, "tops": flops / us / 1e6})
                print(f"M={m} {name:8s} {kind:40s} {us:8.1f} us {flops / us / 1e6:7.1f} T/s", flush=True)
            Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                  "triton": triton.__version__, "checks": checks, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
