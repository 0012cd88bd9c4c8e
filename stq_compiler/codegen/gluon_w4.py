"""The W4 GEMM on Hopper in Gluon: packed 4-bit weight x int8 activation codes, int32
accumulation, the ``stq::fused_linear`` epilogue (zero-point correction, scales, bias, residual
or SwiGLU: a SwiGLU tile holds 64 gate rows above the 64 matching up rows, two TMA loads a K step).

This is what ``fused_linear`` runs on a Hopper GPU for a packed weight with int8 activation codes
(W4A4 with the codes one a byte, as the fusion pass emits them, and W4A8), wherever TMA can read
the operands (``supports``). It computes ``Yᵀ = W Xᵀ`` like ``triton_fused._w4_linear_kernel``,
its Triton twin (which runs everywhere else, and under the interpreter on CPU), with the same
arithmetic: the integer part is exact and the float epilogue runs the same operations in the same
order, so both give the same bits.

Why Gluon: the weight tile is unpacked in registers and is the wgmma's register operand. Triton's
Hopper pipeliner keeps such a dot asynchronous only when its accumulator is float32 (rule 2.1 of
``WGMMAPipeline.cpp``); with our int32 accumulator it waits for every wgmma before unpacking the
next tile, so the tensor cores idle while the ALUs unpack (H200: 740-860 TOP/s). Gluon issues
``warpgroup_mma(is_async=True)`` and waits explicitly: step i's MMA runs while step i + 1's tile
is unpacked. With the pair-packed weight (``pack_int4``: neighbouring codes in a byte) it ran at
980-1130 TOP/s, 81-92 % of fp8 ``torch._scaled_mm``'s rate (``benchmarks/fused_kernels.py``, H200);
joining the nibble planes back into K order cost byte permutes. With the blocked weight the fusion
pass emits (``fused_ops.pack_int4_blocks``: the two nibble planes of a 128-code block are its two
K halves) nothing is joined: each plane meets its half of the activation tile in its own MMA, at
1170-1350 TOP/s, 96-113 % of fp8's rate. Both layouts run here (``BLOCKED``).

Pipeline: ``STAGES`` shared-memory slots per operand, filled by TMA (rows past M or N and codes
past K read as zeros, so edges need no masks until the store); one mbarrier a slot. Step i waits
for its slot, loads the packed tile into registers and unpacks it (four bytes a register,
``triton_fused.SWAR_NIBBLES_ASM``) in the register layout of the MMA's first operand. Blocked: one
MMA per nibble plane against its half of the activation tile; pairs: the planes joined back into K
order first (Gluon infers the byte layout from the joined one, ``AutoLayout``), one MMA. It waits
until only this step's MMAs are in flight and refills the slot step i - 1 used. Step 0 runs
before the loop: an accumulator that could reach the end of a zero-trip loop still holding
``gl.zeros``' plain moves makes ptxas serialize every wgmma (warning C7515).
"""

from __future__ import annotations

import functools
import inspect
import math
import textwrap

import torch

from stq_compiler.codegen.triton_fused import SWAR_NIBBLES_ASM
from stq_compiler.codegen.triton_rtn import cdiv

try:  # Gluon is experimental: present in Triton 3.5+
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - an older Triton: the Triton kernel runs instead
    gluon = None

BLOCK_K = 128  # codes a K step (64 bytes of the packed weight)
MIN_TOKENS = 64  # fewer tokens: the Triton kernel, whose 16- and 32-token row tiles suit them
GROUP_N = 8
EPI_M = 64  # tokens an epilogue chunk


def configs() -> list[tuple[int, int, int, int]]:
    """(BLOCK_N weight rows, BLOCK_M tokens, STAGES, warps): what ``config_for`` picks from; the
    H200 probe's fastest (``(128, 256, 4, 8)`` on every LLaDA-8B linear at 1024 and 4096 tokens;
    ``(128, 128, 4, 4)`` as fast at o_proj's 1024 x 4096, 6 % slower at down_proj's)."""
    return [(128, 256, 4, 8), (128, 128, 4, 4)]


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _is_hopper(device_index: int) -> bool:  # asked once a device, not every launch
    return torch.cuda.get_device_capability(device_index)[0] == 9


# A half-size tile's time relative to a large one's, each on its own multiprocessor: half the
# work at about 88 % of the rate (H200, LLaDA-8B's linears at 1024 tokens:
# results/explore-w4-gluon-tiles-h200.json).
SMALL_TILE_TIME = 0.56


def config_for(m: int, n: int, device_index: int) -> tuple[int, int, int, int]:
    """The tile whose waves of programs end first: ``ceil(tiles / multiprocessors)`` times a
    tile's time. The half-size tile wins where the large one leaves the last wave, or the only
    one, half empty: o_proj and down_proj at 256 and 512 tokens (``generate``'s steps), q/k/v and
    gate/up where their tile counts fall just past a wave. It picks the faster tile in all 12
    cases of the probe above (LLaDA-8B's four linears at 256, 512 and 1024 tokens)."""
    big, small = configs()
    sms = _multiprocessors(device_index)

    def time(config, tile_time):
        return math.ceil(cdiv(m, config[1]) * cdiv(n, config[0]) / sms) * tile_time

    return small if time(small, SMALL_TILE_TIME) < time(big, 1.0) else big


def supports(a: torch.Tensor, wq: torch.Tensor) -> bool:
    """Whether the Gluon kernel can run this GEMM (plain or SwiGLU): a Hopper GPU, int8 codes x
    packed weight, enough tokens, and operands TMA can address (16-byte aligned rows and base
    pointers)."""
    if gluon is None or not a.is_cuda:
        return False
    if a.dtype != torch.int8 or wq.dtype != torch.uint8 or a.shape[0] < MIN_TOKENS:
        return False
    if not _is_hopper(a.device.index):
        return False
    return all(t.stride(-1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a, wq))


if gluon is not None:

    @gluon.jit
    def _nibbles(wb):
        """uint8 bytes -> (low, high) nibbles as int8 in [-8, 7], four bytes a register."""
        return gl.inline_asm_elementwise(asm=SWAR_NIBBLES_ASM, constraints="=r,=r,r", args=[wb],
                                         dtype=(gl.int8, gl.int8), is_pure=True, pack=4)

    @gluon.constexpr_function
    def _warps_per_cta(rows, num_warps):
        warps = [4, 1]  # a warpgroup covers 64 rows; more warps go along the rows first
        while warps[0] * warps[1] != num_warps:
            if rows > 16 * warps[0]:
                warps[0] *= 2
            else:
                warps[1] *= 2
        return warps

    @gluon.constexpr_function
    def _instr_n(rows, cols, num_warps):
        """The wgmma's N (128 at most here; 224 is the 8-bit limit), dividing the warps' share
        of the tile."""
        n_reps = -(-num_warps // -(-rows // 16))
        max_n = max(cols // n_reps, 8)
        n = 128
        while n > max_n or cols % n != 0:
            n -= 8
        return n

    @gluon.jit
    def _issue(w_desc, a_desc, w_smem, a_smem, ready, step, off_n, up_n, off_m, pred, SWIGLU: gl.constexpr):
        """TMA loads of K step ``step`` into its slot (``pred``: only steps inside K). With
        ``SWIGLU`` the slot's weight tile is two loads: the gate rows from ``off_n`` above the up
        rows from ``up_n``."""
        HALF: gl.constexpr = w_desc.block_type.shape[1]
        ROWS: gl.constexpr = w_desc.block_type.shape[0]
        slot = step % w_smem.shape[0]
        bar = ready.index(slot)
        if SWIGLU:
            mbarrier.expect(bar, 2 * w_desc.block_type.nbytes + a_desc.block_type.nbytes, pred=pred)
            w = w_smem.index(slot)
            tma.async_copy_global_to_shared(w_desc, [off_n, step * HALF], bar, w.slice(0, ROWS), pred=pred)
            tma.async_copy_global_to_shared(w_desc, [up_n, step * HALF], bar, w.slice(ROWS, ROWS), pred=pred)
        else:
            mbarrier.expect(bar, w_desc.block_type.nbytes + a_desc.block_type.nbytes, pred=pred)
            tma.async_copy_global_to_shared(w_desc, [off_n, step * HALF], bar, w_smem.index(slot), pred=pred)
        tma.async_copy_global_to_shared(a_desc, [off_m, step * 2 * HALF], bar, a_smem.index(slot), pred=pred)

    @gluon.jit
    def _step(i, w_desc, a_desc, w_smem, a_smem, ready, off_n, up_n, off_m, num_k, acc, w_regs: gl.constexpr,
              BLOCKED: gl.constexpr, SWIGLU: gl.constexpr):
        STAGES: gl.constexpr = w_smem.shape[0]
        BLOCK_N: gl.constexpr = w_smem.shape[1]
        HALF: gl.constexpr = w_smem.shape[2]
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        a = a_smem.index(slot)
        if BLOCKED:
            # the blocked layout (fused_ops.pack_int4_blocks): the nibble planes are the step's two
            # K halves, already in the MMA's register layout; each meets its half of the tile
            lo, hi = _nibbles(w_smem.index(slot).load(w_regs))
            acc = warpgroup_mma(lo, a.slice(0, HALF, dim=1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(hi, a.slice(HALF, HALF, dim=1).permute((1, 0)), acc, is_async=True)
            # step i - 1's MMAs are done: refill its slot with step i + STAGES - 1
            acc = warpgroup_mma_wait(num_outstanding=2, deps=(acc,))
        else:
            lo, hi = _nibbles(w_smem.index(slot).load(gl.AutoLayout()))
            w = gl.set_auto_layout(gl.reshape(gl.join(lo, hi), [BLOCK_N, 2 * HALF]), w_regs)
            acc = warpgroup_mma(w, a.permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        _issue(w_desc, a_desc, w_smem, a_smem, ready, i + STAGES - 1, off_n, up_n, off_m, i + STAGES - 1 < num_k,
               SWIGLU)
        return acc

    @gluon.jit
    def _scaled(part, x_zero, x_scale, w_sum, w_scale, bias, HAS_BIAS: gl.constexpr):
        """An epilogue chunk [rows, tokens] in float32: the operations and their order are
        ``_epilogue_tile``'s, so the bits are the Triton kernel's."""
        part = part - x_zero[None, :] * w_sum[:, None]
        y = part.to(gl.float32) * x_scale[None, :] * w_scale[:, None]  # (acc * x_scale) * w_scale
        if HAS_BIAS:
            y = y + bias[:, None]
        return y

    @gluon.jit
    def _row_params(w_sum_ptr, w_scale_ptr, bias_ptr, offs_n, n_ok, HAS_BIAS: gl.constexpr):
        w_sum = gl.load(w_sum_ptr + offs_n, mask=n_ok, other=0)
        w_scale = gl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0).to(gl.float32)
        bias = w_scale  # unread without HAS_BIAS
        if HAS_BIAS:
            bias = gl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(gl.float32)
        return w_sum, w_scale, bias

    @gluon.jit
    def _w4_gluon_kernel(w_desc, a_desc, x_scale_ptr, x_zero_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, res_ptr, y_ptr,
                         M, N, K, stride_rm, stride_ym,
                         HAS_BIAS: gl.constexpr, HAS_RESIDUAL: gl.constexpr, BLOCKED: gl.constexpr,
                         SWIGLU: gl.constexpr, GROUP_N: gl.constexpr, STAGES: gl.constexpr, EPI_M: gl.constexpr,
                         num_warps: gl.constexpr):
        # N: output columns. With SWIGLU the weight holds 2N rows (gate rows n, up rows N + n) and
        # a program's tile is ROWS gate rows above the ROWS matching up rows, one accumulator
        ROWS: gl.constexpr = w_desc.block_type.shape[0]  # output rows (weight rows a TMA load)
        BLOCK_N: gl.constexpr = 2 * ROWS if SWIGLU else ROWS  # weight rows a tile
        HALF: gl.constexpr = w_desc.block_type.shape[1]
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        gl.static_assert(a_desc.block_type.shape[1] == 2 * HALF)

        # grouped launch order: GROUP_N weight tiles share each activation tile while it is in L2
        # (triton_rtn.grouped_tile)
        pid = gl.program_id(0)
        num_n = gl.cdiv(N, ROWS)
        per_group = GROUP_N * gl.cdiv(M, BLOCK_M)
        first = (pid // per_group) * GROUP_N
        group = gl.minimum(num_n - first, GROUP_N)
        off_n = (first + (pid % per_group) % group) * ROWS
        off_m = ((pid % per_group) // group) * BLOCK_M
        up_n = N + off_n  # SWIGLU: past 2N the rows read as zeros; gate rows past N read up rows,
        # whose outputs the store masks

        w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, HALF], w_desc.layout)
        a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, 2 * HALF], a_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for slot in gl.static_range(STAGES):
            mbarrier.init(ready.index(slot), count=1)
        mma: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=_warps_per_cta(BLOCK_N, num_warps),
            instr_shape=[16, _instr_n(BLOCK_N, BLOCK_M, num_warps), 32])
        w_regs: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)

        num_k = gl.cdiv(K, 2 * HALF)  # >= 1
        for pre in gl.static_range(STAGES - 1):
            _issue(w_desc, a_desc, w_smem, a_smem, ready, pre, off_n, up_n, off_m, pre < num_k, SWIGLU)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.int32, mma)
        acc = _step(0, w_desc, a_desc, w_smem, a_smem, ready, off_n, up_n, off_m, num_k, acc, w_regs, BLOCKED, SWIGLU)
        for i in range(1, num_k):
            acc = _step(i, w_desc, a_desc, w_smem, a_smem, ready, off_n, up_n, off_m, num_k, acc, w_regs, BLOCKED,
                        SWIGLU)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for slot in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(slot))

        # epilogue in column chunks of EPI_M tokens, read back from shared memory with threads
        # along n (the output's contiguous axis): the whole tile at once holds too many registers
        # (a float32 copy and 64-bit pointers, 128 of each a thread at 128 x 256: spills)
        acc_smem = gl.allocate_shared_memory(gl.int32, [BLOCK_N, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [0, 1]))
        acc_smem.store(acc)
        out: gl.constexpr = gl.BlockedLayout([ROWS // 32, 1], [32, 1], [1, num_warps], [0, 1])
        offs_n = off_n + gl.arange(0, ROWS, layout=gl.SliceLayout(1, out))
        n_ok = offs_n < N
        w_sum, w_scale, bias = _row_params(w_sum_ptr, w_scale_ptr, bias_ptr, offs_n, n_ok, HAS_BIAS)
        if SWIGLU:
            up_sum, up_scale, up_bias = _row_params(w_sum_ptr, w_scale_ptr, bias_ptr, offs_n + N, n_ok, HAS_BIAS)
        for c in gl.static_range(BLOCK_M // EPI_M):
            offs_m = off_m + c * EPI_M + gl.arange(0, EPI_M, layout=gl.SliceLayout(0, out))
            m_ok = offs_m < M
            x_zero = gl.load(x_zero_ptr + offs_m, mask=m_ok, other=0)
            x_scale = gl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0).to(gl.float32)
            chunk = acc_smem.slice(c * EPI_M, EPI_M, dim=1)
            y = _scaled(chunk.slice(0, ROWS).load(out), x_zero, x_scale, w_sum, w_scale, bias, HAS_BIAS)
            if SWIGLU:  # as the Triton kernel: silu(gate) = gate * (1 / (1 + exp(-gate)))
                up = _scaled(chunk.slice(ROWS, ROWS).load(out), x_zero, x_scale, up_sum, up_scale, up_bias, HAS_BIAS)
                sig = gl.div_rn(gl.full([ROWS, EPI_M], 1.0, gl.float32, out), 1.0 + gl.exp(-y))
                y = (y * sig) * up
            ok = n_ok[:, None] & m_ok[None, :]
            rows = offs_m.to(gl.int64)[None, :]
            if HAS_RESIDUAL:
                y = y + gl.load(res_ptr + rows * stride_rm + offs_n[:, None], mask=ok, other=0.0).to(gl.float32)
            gl.store(y_ptr + rows * stride_ym + offs_n[:, None], y.to(y_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def _layouts(load_rows: int, block_m: int):
    """The shared-memory layouts of a weight tile and an activation tile (made once a shape:
    ``get_default_for`` cost ~10 µs a call on the host)."""
    return (gl.NVMMASharedLayout.get_default_for([load_rows, BLOCK_K // 2], gl.uint8),
            gl.NVMMASharedLayout.get_default_for([block_m, BLOCK_K], gl.int8))


def w4_linear_gluon(a, wq, x_scale, x_zero, w_scale, w_sum, bias, residual, y, k: int, config=None,
                    blocked: bool = False, swiglu: bool = False) -> None:
    """``y[m, n] = epilogue(Σ_k a[m, k] · w[n, k])`` into ``y`` ([M, N], row stride any);
    ``a`` int8 [M, K], ``wq`` packed uint8 [N, ceil(K/2)], or with ``blocked`` the blocked layout
    viewed as [N, 64·ceil(K/128)] (``supports`` must hold). ``x_scale``,
    ``x_zero`` per token and ``w_scale``, ``w_sum`` per row, contiguous; ``bias`` [N] or None;
    ``residual`` [M, N] (last stride 1) or None. ``swiglu``: ``wq`` holds the gate rows above
    the up rows (2N), and ``y[m, n] = silu(gate) · up`` ([M, N]; no residual)."""
    m, rows = a.shape[0], wq.shape[0]
    n = rows // 2 if swiglu else rows
    block_n, block_m, stages, warps = config or config_for(m, rows, a.device.index)
    load_rows = block_n // 2 if swiglu else block_n  # a SwiGLU tile: gate rows above up rows, two loads
    w_layout, a_layout = _layouts(load_rows, block_m)
    w_desc = TensorDescriptor(wq, list(wq.shape), list(wq.stride()), [load_rows, BLOCK_K // 2], w_layout)
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [block_m, BLOCK_K], a_layout)
    grid = (cdiv(m, block_m) * cdiv(n, load_rows),)
    _w4_gluon_kernel[grid](
        w_desc, a_desc, x_scale, x_zero, w_scale, w_sum,
        bias if bias is not None else w_scale, residual if residual is not None else y, y,
        m, n, k, residual.stride(0) if residual is not None else 0, y.stride(0),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, BLOCKED=blocked, SWIGLU=swiglu,
        GROUP_N=GROUP_N, STAGES=stages, EPI_M=EPI_M,
        num_warps=warps, enable_fp_fusion=False,
    )


def kernel_sources() -> dict[str, str]:
    """The Gluon source of each function of the kernel, by name (for inspection and dumps)."""
    if gluon is None:
        return {}
    return {fn.fn.__name__: textwrap.dedent(inspect.getsource(fn.fn)) for fn in (_nibbles, _issue, _step, _scaled, _row_params, _w4_gluon_kernel)}
