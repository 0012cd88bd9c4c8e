"""Compile the fused kernels for Hopper (sm_90a) without a GPU, and report what the chip would run.

Triton compiles to PTX and ``ptxas`` (both in the Triton wheel) needs no driver, so on a CPU
machine we can still see, per kernel variant: shared memory, registers, register spills (ptxas
``-v``), whether the main loop is software-pipelined (asynchronous global->shared copies in the
TTGIR) and which matrix instruction the SASS uses (``IGMMA``/``HGMMA``: wgmma; ``IMMA``/``HMMA``:
mma.sync). Arguments are specialised as a real launch would be (pointers and integers divisible
by 16 marked so, integers equal to 1 made constants).

    python -m stq_compiler.codegen.hopper_codegen            # the table for every fused variant

Used by ``benchmarks/sm90_codegen.py`` and a test that pins the key variants (no spills, wgmma).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import triton

# H100/H200: 227 KB of shared memory a block at most.
SM90_MAX_SHARED = 232448


@dataclass
class KernelResources:
    name: str
    shared_bytes: int
    registers: int
    spill_bytes: int
    async_copies: int  # asynchronous global->shared copies in the TTGIR: > 0 when pipelined
    mma: list[str]  # matrix instructions in the SASS
    register_a: bool = False  # a wgmma reads its first operand from registers, not shared memory
    wgmma_serialized: bool = False  # ptxas had to serialize the wgmmas (warning C7515)
    # SASS instructions in the kernel (static, a thread's view: each runs once per warp; loops
    # counted once): without loops, the work of one program per warp, which tracked the activation
    # kernels' time on the H200
    instructions: int = 0

    @property
    def uses_wgmma(self) -> bool:
        return any(op.endswith("GMMA") for op in self.mma)

    def row(self) -> str:
        return (f"{self.name:<52} smem={self.shared_bytes:>7} regs={self.registers:>3} "
                f"spill={self.spill_bytes:>5} sass={self.instructions:>5} async_copies={self.async_copies:>2} "
                f"mma={','.join(self.mma) or '-'}"
                f"{' A=regs' if self.register_a else ''}{' SERIALIZED' if self.wgmma_serialized else ''}")

    def as_dict(self) -> dict:
        return asdict(self)


def _nvidia_bin(tool: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def available() -> bool:
    """Whether this Triton can compile for sm_90a here (its ptxas and cuobjdump are present)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(_nvidia_bin("ptxas")) and os.path.exists(_nvidia_bin("cuobjdump"))


def compile_sm90(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int, maxnreg: int | None = None):
    """``args``: argument name -> pointer type string (``"*i8"``, 16-byte aligned) or a sample
    value (int or float); ``constexprs``: the ``tl.constexpr`` arguments; ``maxnreg``: registers
    a thread at most, as the launch asks."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    while not hasattr(fn, "arg_names"):  # Autotuner / Heuristics wrap the JITFunction
        fn = fn.fn
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = constexprs.get(name, args.get(name))
        if name in constexprs:
            signature[name], constants[(i,)] = "constexpr", value
        elif isinstance(value, str):
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constants[(i,)] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": False}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def resources(compiled, name: str) -> KernelResources:
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        info = subprocess.run([_nvidia_bin("ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin],
                              capture_output=True, text=True, check=True).stderr
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout

    def number(pattern):
        found = re.search(pattern, info)
        return int(found.group(1)) if found else 0

    return KernelResources(
        name=name,
        shared_bytes=compiled.metadata.shared,
        registers=number(r"Used (\d+) registers"),
        spill_bytes=number(r"(\d+) bytes spill stores"),
        async_copies=len(re.findall(r"async_copy_global_to_local|async_tma_copy", compiled.asm["ttgir"])),
        mma=sorted(set(re.findall(r"\b([A-Z]GMMA|[A-Z]MMA)\b", sass))),
        register_a=bool(re.search(r"warp_group_dot [^\n]*?\} : tensor<[^,>]*, #ttg\.dot_op<\{opIdx = 0", compiled.asm["ttgir"])),
        wgmma_serialized="C7515" in info,
        instructions=len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, re.M)),
    )


# ----------------------------------------------------------------------------------------------
# The fused kernels' variants


def w4_gemm_variant(config, swiglu: bool, m=4096, n=4096, k=4096, blocked: bool = False) -> KernelResources:
    """``_w4_linear_kernel`` (packed 4-bit weight, int8 activation codes) for one config;
    ``blocked``: the weight in ``fused_ops.pack_int4_blocks``' layout (BLOCK_K = 128 only)."""
    from stq_compiler.codegen import triton_fused

    kb = k // 2
    args = {
        "a_ptr": "*i8", "b_ptr": "*u8", "x_scale_ptr": "*fp32", "x_zero_ptr": "*i32", "w_scale_ptr": "*fp32",
        "w_sum_ptr": "*i32", "bias_ptr": "*bf16", "res_ptr": "*bf16", "y_ptr": "*bf16",
        "M": m, "N": n, "K": k, "KB": kb, "stride_am": k, "stride_bn": kb, "stride_rm": n, "stride_ym": n,
    }
    constexprs = {"HAS_BIAS": False, "SWIGLU": swiglu, "HAS_RESIDUAL": not swiglu, "BF16_BITS": False,
                  "EVEN_K": True, "SWAR": True, "BLOCKED": blocked, **config.kwargs}
    compiled = compile_sm90(triton_fused._w4_linear_kernel_body, args, constexprs, config.num_warps, config.num_stages)
    kw = config.kwargs
    name = (f"gemm w4 (int8 codes{', blocked weight' if blocked else ''}){' swiglu' if swiglu else ''} "
            f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{config.num_warps} s{config.num_stages}")
    return resources(compiled, name)


def compile_gluon_sm90(kernel, signature: dict, constexprs: dict, num_warps: int):
    """A Gluon kernel for sm_90a: ``signature`` maps every runtime argument to its type string
    (``"*i8"``, ``"i32"``, ``"tensordesc<u8[128, 64],NVMMASharedLayout(...)>"``)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = kernel.arg_names
    signature, constants = dict(signature), {}
    for name, value in {**constexprs, "num_warps": num_warps}.items():
        if name in names:
            signature[name], constants[(names.index(name),)] = "constexpr", value
    source = GluonASTSource(kernel, {name: signature[name] for name in names}, constants, {})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": False})


def w4_gluon_variant(config, residual: bool = True, bias: bool = False, blocked: bool = True, swiglu: bool = False,
                     m=4096, n=4096, k=4096) -> KernelResources:
    """``gluon_w4._w4_gluon_kernel`` for one (BLOCK_N, BLOCK_M, STAGES, warps) configuration,
    bfloat16 out; ``blocked``: the weight in ``fused_ops.pack_int4_blocks``' layout; ``swiglu``:
    the SwiGLU epilogue (gate and up rows, two weight loads a step)."""
    from triton.experimental.gluon import language as gl

    from stq_compiler.codegen import gluon_w4

    block_n, block_m, stages, warps = config
    load_rows = block_n // 2 if swiglu else block_n
    w_layout = gl.NVMMASharedLayout.get_default_for([load_rows, gluon_w4.BLOCK_K // 2], gl.uint8)
    a_layout = gl.NVMMASharedLayout.get_default_for([block_m, gluon_w4.BLOCK_K], gl.int8)
    signature = {
        "w_desc": f"tensordesc<u8[{load_rows}, {gluon_w4.BLOCK_K // 2}],{w_layout!r}>",
        "a_desc": f"tensordesc<i8[{block_m}, {gluon_w4.BLOCK_K}],{a_layout!r}>",
        "x_scale_ptr": "*fp32", "x_zero_ptr": "*i32", "w_scale_ptr": "*fp32", "w_sum_ptr": "*i32",
        "bias_ptr": "*bf16", "res_ptr": "*bf16", "y_ptr": "*bf16",
        "M": "i32", "N": "i32", "K": "i32", "stride_rm": "i32", "stride_ym": "i32",
    }
    constexprs = {"HAS_BIAS": bias, "HAS_RESIDUAL": residual, "BLOCKED": blocked, "SWIGLU": swiglu,
                  "GROUP_N": gluon_w4.GROUP_N, "STAGES": stages, "EPI_M": gluon_w4.EPI_M}
    compiled = compile_gluon_sm90(gluon_w4._w4_gluon_kernel, signature, constexprs, warps)
    epilogue = "+".join(["bias"] * bias + ["residual"] * residual + ["swiglu"] * swiglu) or "plain"
    layout = "blocked" if blocked else "pairs"
    return resources(compiled, f"gemm w4 gluon {layout} {epilogue} {block_n}x{block_m}x{gluon_w4.BLOCK_K} w{warps} s{stages}")


def gemm_variant(config, a_packed: bool, b_packed: bool, swiglu: bool, m=4096, n=4096, k=4096) -> KernelResources:
    """``_fused_linear_kernel`` for one autotuning config and operand mode, at an even shape
    (a packed weight with int8 activation codes runs ``w4_gemm_variant``'s kernel instead)."""
    from stq_compiler.codegen import triton_fused

    kb = k // 2
    args = {
        "a_ptr": "*u8" if a_packed else "*i8", "b_ptr": "*u8" if b_packed else "*i8",
        "x_scale_ptr": "*fp32", "x_zero_ptr": "*i32", "w_scale_ptr": "*fp32", "w_sum_ptr": "*i32",
        "bias_ptr": "*bf16", "res_ptr": "*bf16", "y_ptr": "*bf16",
        "M": m, "N": n, "K": k, "KB": kb,
        "stride_am": kb if a_packed else k, "stride_ak": 1, "stride_bn": kb if b_packed else k, "stride_bk": 1,
        "stride_rm": n, "stride_ym": n,
    }
    constexprs = {
        "A_PACKED": a_packed, "B_PACKED": b_packed, "HAS_BIAS": False, "SWIGLU": swiglu, "HAS_RESIDUAL": not swiglu,
        "BF16_BITS": False, "EVEN_K": True, **config.kwargs,
    }
    compiled = compile_sm90(triton_fused._fused_linear_kernel_body, args, constexprs, config.num_warps, config.num_stages)
    kw = config.kwargs
    mode = f"{'w4' if b_packed else 'w8'}{'a4' if a_packed else 'a8'}{' swiglu' if swiglu else ''}"
    name = f"gemm {mode} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{config.num_warps} s{config.num_stages}"
    return resources(compiled, name)


def quantize_variant(spec, m: int = 4096, name: str = "", x_dtype: str = "bf16") -> KernelResources:
    """The activation kernel ``fused_quantize_triton`` launches for one ``FusedQuantizeSpec``:
    ``_fused_quantize_kernel``; for a Kronecker tile above ``MAX_FUSED_KRON_TILE``
    ``_token_kron_split_kernel`` where ``token_split`` splits a side, else
    ``_token_kron_quantize_kernel``, or ``_chunk_kron_quantize_kernel`` above
    ``MAX_TOKEN_KRON_TILE`` (TAC runs before it, see ``tac_variant``; its input is then float32)."""
    from stq_compiler.codegen import triton_fused

    if spec.tac_group:
        raise ValueError("TAC runs as its own kernel (tac_variant); give the spec without it")
    k, bits = spec.features, spec.bits
    if spec.kron is not None and triton_fused._kron_tile(*spec.kron) > triton_fused.MAX_FUSED_KRON_TILE:
        split = triton_fused.token_split(*spec.kron)
        if split is not None:
            return token_split_variant(spec, split, m, name, x_dtype)
    if spec.kron is not None and triton_fused._kron_chunked(*spec.kron):
        return chunk_kron_variant(spec, m, name, x_dtype)
    d1, d2, d1p, d2p, block_m = triton_fused._quantize_tile(spec, m)
    by_token = spec.kron is not None and d1p * d2p > triton_fused.MAX_FUSED_KRON_TILE
    ptrs = ("norm_w_ptr", "inv_smooth_ptr", "p1_ptr", "p2_ptr", "gate_m_ptr", "gate_u_ptr", "scale_ptr")
    args = {p: "*fp32" for p in ptrs}
    args.update({"x_ptr": f"*{x_dtype}", "q_ptr": "*u8" if spec.packed else "*i8", "zero_ptr": "*i32", "is_masked_ptr": "*u8",
                 "M": m, "stride_xm": k, "stride_qm": (k + 1) // 2 if spec.packed else k, "eps": 1e-5})
    constexprs = {
        "K": k, "D1": d1, "D2": d2, "D1P": d1p, "D2P": d2p,
        "QMIN": -(1 << (bits - 1)), "QMAX": (1 << (bits - 1)) - 1, "LEVELS": float((1 << bits) - 1), "PACK": spec.packed,
        "HAS_NORM": spec.rms_norm, "HAS_NORM_WEIGHT": spec.norm_weight,
        "HAS_SMOOTH": spec.smooth, "HAS_GATE": spec.gate, "KRON_PRECISION": triton_fused.KRON_PRECISION,
    }
    if by_token:
        kernel, warps, tile = triton_fused._token_kron_quantize_kernel, triton_fused.TOKEN_KRON_WARPS, f"1x{d1p}x{d2p}"
        presplit = triton_fused.TOKEN_KRON_PRESPLIT and triton_fused.KRON_PRECISION == "bf16x3"
        constexprs.update({"X_IS_BF16": x_dtype == "bf16", "PRESPLIT": presplit})
        args.update({p: "*bf16" if presplit else "*fp32" for p in ("p1t_hi_ptr", "p1t_lo_ptr", "p2_hi_ptr", "p2_lo_ptr")})
        maxnreg = triton_fused.TOKEN_KRON_MAXNREG
    else:
        kernel, warps = triton_fused._fused_quantize_kernel, triton_fused._quantize_warps(block_m * d1p * d2p)
        presplit = triton_fused.FUSED_KRON_PRESPLIT and spec.kron is not None and triton_fused.KRON_PRECISION == "bf16x3"
        constexprs.update({"HAS_KRON": spec.kron is not None, "BLOCK_M": block_m, "PRESPLIT": presplit})
        args.update({p: "*bf16" if presplit else "*fp32" for p in ("p1_hi_ptr", "p1_lo_ptr", "p2_hi_ptr", "p2_lo_ptr")})
        tile = f"{block_m}x{d1p}x{d2p}"
        maxnreg = triton_fused.QUANTIZE_MAXNREG
    compiled = compile_sm90(kernel, args, constexprs, warps, 1, maxnreg)
    label = name or " ".join(spec.stages)
    return resources(compiled, f"quantize {label} K={k} tile={tile} w{warps}")


def token_split_variant(spec, split, m: int = 4096, name: str = "", x_dtype: str = "bf16") -> KernelResources:
    """``_token_kron_split_kernel`` for one ``FusedQuantizeSpec`` and its ``token_split``."""
    from stq_compiler.codegen import triton_fused

    k, bits = spec.features, spec.bits
    d1, d2 = spec.kron
    split_j, ca, cb = split
    r_size, c_size = (d1, d2) if split_j else (d2, d1)
    rp = max(16, triton.next_power_of_2(r_size))
    presplit = triton_fused.TOKEN_KRON_PRESPLIT
    ptrs = ("norm_w_ptr", "inv_smooth_ptr", "lf_ptr", "rf_ptr", "gate_m_ptr", "gate_u_ptr", "scale_ptr")
    args = {p: "*fp32" for p in ptrs}
    args.update({p: "*bf16" if presplit else "*fp32" for p in ("lt_hi_ptr", "lt_lo_ptr", "rf_hi_ptr", "rf_lo_ptr")})
    args.update({"x_ptr": f"*{x_dtype}", "q_ptr": "*u8" if spec.packed else "*i8", "zero_ptr": "*i32", "is_masked_ptr": "*u8",
                 "M": m, "stride_xm": k, "stride_qm": (k + 1) // 2 if spec.packed else k, "eps": 1e-5})
    constexprs = {
        "K": k, "D2": d2, "R": r_size, "RP": rp, "C": c_size, "CA": ca, "CB": cb, "SPLIT_J": split_j,
        "QMIN": -(1 << (bits - 1)), "QMAX": (1 << (bits - 1)) - 1, "LEVELS": float((1 << bits) - 1), "PACK": spec.packed,
        "HAS_NORM": spec.rms_norm, "HAS_NORM_WEIGHT": spec.norm_weight, "HAS_SMOOTH": spec.smooth, "HAS_GATE": spec.gate,
        "KRON_PRECISION": triton_fused.KRON_PRECISION, "X_IS_BF16": x_dtype == "bf16", "PRESPLIT": presplit,
    }
    warps = triton_fused.TOKEN_SPLIT_WARPS
    compiled = compile_sm90(triton_fused._token_kron_split_kernel, args, constexprs, warps, 1,
                            triton_fused.token_split_maxnreg(rp * (ca + cb)))
    label = name or " ".join(spec.stages)
    return resources(compiled, f"quantize {label} K={k} tile=1x{rp}x({ca}+{cb}) w{warps}")


def chunk_kron_variant(spec, m: int = 4096, name: str = "", x_dtype: str = "bf16") -> KernelResources:
    """``_chunk_kron_quantize_kernel`` for one ``FusedQuantizeSpec`` (see ``quantize_variant``)."""
    from stq_compiler.codegen import triton_fused

    k, bits = spec.features, spec.bits
    d1, d2 = spec.kron
    d1p, ch = max(16, triton.next_power_of_2(d1)), triton_fused.KRON_CHUNK
    ptrs = ("norm_w_ptr", "inv_smooth_ptr", "p1_ptr", "p2_ptr", "gate_m_ptr", "gate_u_ptr", "scale_ptr", "y_ptr")
    args = {p: "*fp32" for p in ptrs}
    presplit = triton_fused.CHUNK_KRON_PRESPLIT and triton_fused.KRON_PRECISION == "bf16x3"
    args.update({p: "*bf16" if presplit else "*fp32" for p in ("p1t_hi_ptr", "p1t_lo_ptr", "p2_hi_ptr", "p2_lo_ptr")})
    args.update({"x_ptr": f"*{x_dtype}", "q_ptr": "*u8" if spec.packed else "*i8", "zero_ptr": "*i32", "is_masked_ptr": "*u8",
                 "M": m, "stride_xm": k, "stride_qm": (k + 1) // 2 if spec.packed else k, "eps": 1e-5})
    constexprs = {
        "PRESPLIT": presplit,
        "K": k, "D1": d1, "D2": d2, "D1P": d1p, "CH": ch, "NCH": triton.cdiv(d2, ch),
        "QMIN": -(1 << (bits - 1)), "QMAX": (1 << (bits - 1)) - 1, "LEVELS": float((1 << bits) - 1), "PACK": spec.packed,
        "HAS_NORM": spec.rms_norm, "HAS_NORM_WEIGHT": spec.norm_weight, "HAS_SMOOTH": spec.smooth, "HAS_GATE": spec.gate,
        "KRON_PRECISION": triton_fused.KRON_PRECISION, "X_IS_BF16": x_dtype == "bf16",
    }
    warps = triton_fused.CHUNK_KRON_WARPS
    compiled = compile_sm90(triton_fused._chunk_kron_quantize_kernel, args, constexprs, warps, 1)
    label = name or " ".join(spec.stages)
    return resources(compiled, f"quantize {label} K={k} chunks={d1p}x{ch}x{triton.cdiv(d2, ch)} w{warps}")


def tac_variant(k: int, g: int = 16, m: int = 4096) -> KernelResources:
    """``_tac_affine_kernel`` (bfloat16 in, float32 out), as ``tac_affine_triton`` launches it."""
    from stq_compiler.codegen import triton_fused

    args = {"z_ptr": "*bf16", "m_ptr": "*fp32", "d_ptr": "*fp32", "out_ptr": "*fp32", "M": m, "stride_zm": k, "stride_om": k}
    block_t, warps = triton_fused.TAC_BLOCK_T, triton_fused.TAC_WARPS
    compiled = compile_sm90(triton_fused._tac_affine_kernel, args, {"G": g, "BLOCK_T": block_t}, warps, 1)
    return resources(compiled, f"tac g={g} K={k} tile={block_t}x{g} w{warps}")


def site_specs():
    """(name, FusedQuantizeSpec) of every activation site of LLaDA-8B and Dream-7B."""
    from stq_compiler.calibration.transforms import kronecker_factors
    from stq_compiler.fused_ops import FusedQuantizeSpec

    specs = []
    for model, hidden in (("llada", 4096), ("dream", 3584)):
        kron = kronecker_factors(hidden)
        specs.append((f"{model} qkv/gate_up", FusedQuantizeSpec(hidden, 4, rms_norm=True, kron=kron, gate=True)))
        specs.append((f"{model} o (after TAC)", FusedQuantizeSpec(hidden, 4, kron=kron, gate=True)))
    specs.append(("llada down", FusedQuantizeSpec(12288, 4, kron=kronecker_factors(12288), gate=True)))
    specs.append(("dream down", FusedQuantizeSpec(18944, 4, kron=kronecker_factors(18944), gate=True)))
    return specs


def all_variants():
    from stq_compiler.codegen import triton_fused

    for name, spec in site_specs():
        x_dtype = "fp32" if "TAC" in name else "bf16"
        yield lambda name=name, spec=spec, x_dtype=x_dtype: quantize_variant(spec, name=name, x_dtype=x_dtype)
    for k in (4096, 3584):
        yield lambda k=k: tac_variant(k)
    for a_packed, b_packed in ((True, True), (False, False)):
        for swiglu in (False, True):
            for config in triton_fused.gemm_configs():
                if swiglu and not triton_fused.swiglu_fits(config):
                    continue
                yield lambda c=config, a=a_packed, b=b_packed, s=swiglu: gemm_variant(c, a, b, s)
    for swiglu in (False, True):
        for config in triton_fused.w4_gemm_configs():
            if swiglu and not triton_fused.w4_swiglu_fits(config):
                continue
            yield lambda c=config, s=swiglu: w4_gemm_variant(c, s)
            if config.kwargs["BLOCK_K"] == triton_fused.BLOCKED_STEP:
                yield lambda c=config, s=swiglu: w4_gemm_variant(c, s, blocked=True)
    from stq_compiler.codegen import gluon_w4

    if gluon_w4.gluon is not None:
        for config in gluon_w4.configs():
            for blocked in (True, False):
                for residual, bias in ((True, False), (False, True)):
                    yield lambda c=config, r=residual, b=bias, bl=blocked: w4_gluon_variant(c, r, b, bl)
            yield lambda c=config: w4_gluon_variant(c, residual=False, swiglu=True)


def main() -> list[KernelResources]:
    rows = []
    for make in all_variants():
        row = make()
        print(row.row(), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
