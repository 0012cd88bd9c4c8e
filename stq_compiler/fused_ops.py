"""Fused quantized ops (namespace ``stq``): the activation side of a site in one op, the GEMM with
its epilogue in another, and the packed 4-bit layout they share.

``stq::fused_quantize(x, bits, ...) -> (codes, scale, zero)`` runs, per token, the stages a site
needs, each optional, in this order:

1. RMSNorm: ``n = x * rsqrt(mean(x²) + eps)``, times the norm weight when one is given;
2. TAC block affine ``z_b M_bᵀ + d_b`` (``stq::tac_block_affine``), in float32;
3. smoothing ``× inv_smooth`` (one value per feature), in float32;
4. the Kronecker transform ``x (P1 ⊗ P2)`` (``stq::kron_transform``), in float32;
5. the state gate and per-token asymmetric quantization (``stq::quantize_per_token``);
6. for 4 bits, two codes packed per byte (below), unless ``pack=False``: then the 4-bit codes are
   int8, one a byte, which is what the fast W4 GEMM reads (``codegen/triton_fused.py``).

Everything is computed in float32 from x on: the unfused graph rounds the norm's and TAC's
outputs to the model dtype (bfloat16), the fused op does not (a bfloat16 rounding would turn the
kernel's float32 reduction-order differences into occasional one-ulp jumps of 2**-8). The
reference here, built from the reference ops, is the definition. The Triton kernel
(``stq_compiler.codegen.triton_fused``) sums in another order, so its float stages agree to
float32 rounding (about 1e-6 relative), not bit for bit, and a code can differ by one where a
value sits within that of a rounding tie.

``stq::fused_linear(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, residual, swiglu, out_dtype)``:
the ``stq::quantized_linear`` arithmetic (int32 accumulation, zero-point correction, float32
scales and bias) on int8 or packed 4-bit codes, then optionally SwiGLU (the weight holds the gate
rows then the up rows; the output is ``silu(gate) * up``, half as wide) or a residual add, in
float32, and one cast to ``out_dtype``.

Packed 4-bit layout (``torch.uint8``, two codes per byte along K): byte ``j`` of a row holds code
``2j`` in its low nibble and code ``2j + 1`` in its high nibble, each as a two's-complement
4-bit integer; an odd K is padded with a zero code. With both operands packed the GEMM unpacks
each byte tile into its even-k plane ``(b << 4) >> 4`` and odd-k plane ``b >> 4`` and runs one
int8 dot per plane (a contraction does not care in which order it visits k); with int8
activation codes it unpacks the weight and joins the planes back into K order, so the
activation tile is used as it lies in memory. Padding codes are zero in the weight, so the
padded k adds nothing whatever the activation holds there.

Blocked 4-bit weight layout (``pack_int4_blocks``; a weight only, with int8 activation codes: what
the fusion pass emits): ``torch.uint8`` [N, ceil(K/128), 64], K in blocks of 128 codes, byte ``j``
of a block holding its code ``j`` in the low nibble and code ``j + 64`` in the high one (K padded
with zero codes). Its nibble planes are the two K halves of a block, so the GEMM multiplies each
with one half of the activation tile and joins nothing (on the H200 the join's byte permutes cost
15-20 % of the W4 GEMM's time). The third dimension tells the layouts apart.
"""

# torch.library.custom_op reads the signatures: Optional[...] as in stq_compiler.ops.
# ruff: noqa: UP045
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from stq_compiler import tac_ops
from stq_compiler.ops import (
    QuantizedWeight,
    _check_bits,
    kron_transform_reference,
    quantize_per_token_reference,
    quantized_linear_reference,
)

# ----------------------------------------------------------------------------------------------
# Packed 4-bit layout


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] [..., K] -> uint8 [..., ceil(K/2)]: code 2j low nibble, 2j+1 high."""
    if codes.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 codes, got {codes.dtype}")
    k = codes.shape[-1]
    c = codes.to(torch.int32)
    if k % 2:
        c = F.pad(c, (0, 1))
    pairs = c.reshape(*c.shape[:-1], -1, 2)
    byte = (pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)
    return byte.to(torch.uint8)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of ``pack_int4``: uint8 [..., ceil(k/2)] -> int8 codes [..., k]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8 bytes, got {packed.dtype}")
    if packed.shape[-1] != (k + 1) // 2:
        raise ValueError(f"unpack_int4: {packed.shape[-1]} bytes cannot hold {k} codes")
    b = packed.to(torch.int32)
    lo = ((b & 0xF) ^ 8) - 8
    hi = ((b >> 4) ^ 8) - 8
    codes = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], -1)
    return codes[..., :k].to(torch.int8)


BLOCK_CODES = 128  # codes a block of the blocked weight layout (64 bytes)


def pack_int4_blocks(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] [N, K] -> uint8 [N, ceil(K/128), 64] (the blocked weight layout)."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise TypeError(f"pack_int4_blocks expects a 2-D int8 weight, got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    blocks = -(-k // BLOCK_CODES)
    c = F.pad(codes.to(torch.int32), (0, blocks * BLOCK_CODES - k)).reshape(n, blocks, 2, BLOCK_CODES // 2)
    return ((c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)).to(torch.uint8)


def unpack_int4_blocks(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of ``pack_int4_blocks``: uint8 [N, ceil(k/128), 64] -> int8 codes [N, k]."""
    if packed.dtype != torch.uint8 or packed.dim() != 3 or packed.shape[2] != BLOCK_CODES // 2:
        raise TypeError(f"unpack_int4_blocks expects uint8 [N, blocks, 64], got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != -(-k // BLOCK_CODES):
        raise ValueError(f"unpack_int4_blocks: {packed.shape[1]} blocks of 128 codes cannot hold {k} codes")
    b = packed.to(torch.int32)
    lo = ((b & 0xF) ^ 8) - 8
    hi = ((b >> 4) ^ 8) - 8
    return torch.stack((lo, hi), dim=2).reshape(packed.shape[0], -1)[:, :k].to(torch.int8)


@dataclass(frozen=True)
class PackedWeight:
    """A quantized weight in the GEMM's storage: ``q`` uint8 [N, ceil(K/2)] for 4 bits, or the
    blocked uint8 [N, ceil(K/128), 64] (int8 [N, K] for 8 bits), ``scale`` [N] float32, ``w_sum`` [N]
    int32 (of the unpacked codes)."""

    q: torch.Tensor
    scale: torch.Tensor
    w_sum: torch.Tensor
    bits: int
    in_features: int

    def codes(self) -> torch.Tensor:
        return weight_codes(self.q, self.in_features)


def pack_weight(w: QuantizedWeight) -> PackedWeight:
    """Pack a weight once, offline: 4-bit codes two per byte, 8-bit codes as they are."""
    if w.bits == 4 and (w.q.min() < -8 or w.q.max() > 7):
        raise ValueError("pack_weight: 4-bit codes must lie in [-8, 7]")
    q = pack_int4(w.q) if w.bits == 4 else w.q
    return PackedWeight(q=q.contiguous(), scale=w.scale, w_sum=w.w_sum, bits=w.bits, in_features=w.q.shape[1])


def codes_of(q: torch.Tensor, k: int) -> torch.Tensor:
    """int8 codes [..., k] from either storage (int8 as is, uint8 packed)."""
    return unpack_int4(q, k) if q.dtype == torch.uint8 else q


def weight_codes(wq: torch.Tensor, k: int) -> torch.Tensor:
    """int8 codes [N, k] of a GEMM weight in any storage (int8, packed, blocked)."""
    return unpack_int4_blocks(wq, k) if wq.dim() == 3 else codes_of(wq, k)


# ----------------------------------------------------------------------------------------------
# stq::fused_quantize


@dataclass(frozen=True)
class FusedQuantizeSpec:
    """Which stages one site's activation kernel runs, and its shapes: the kernel is specialised
    on exactly this (one compiled variant per spec)."""

    features: int
    bits: int
    rms_norm: bool = False
    norm_weight: bool = False
    tac_group: int = 0  # 0: no TAC
    smooth: bool = False
    kron: Optional[tuple[int, int]] = None  # (d1, d2)
    gate: bool = False
    pack: bool = True  # 4-bit codes two a byte (False: one a byte, as int8)

    @property
    def stages(self) -> list[str]:
        names = []
        if self.rms_norm:
            names.append("rms_norm" + ("*w" if self.norm_weight else ""))
        if self.tac_group:
            names.append(f"tac(g={self.tac_group})")
        if self.smooth:
            names.append("smooth")
        if self.kron:
            names.append(f"kron({self.kron[0]}x{self.kron[1]})")
        if self.gate:
            names.append("gate")
        names.append(f"quantize(a{self.bits})" + ("+pack" if self.packed else ""))
        return names

    @property
    def packed(self) -> bool:
        return self.bits == 4 and self.pack


def fused_quantize_spec(
    x, bits, norm_weight=None, rms_eps=None, tac_m=None, tac_d=None, inv_smooth=None,
    p1=None, p2=None, is_masked=None, gate_masked=None, gate_unmasked=None, pack=True,
) -> FusedQuantizeSpec:
    """The spec of a call (validating its arguments): what both the reference and the kernel run."""
    _check_bits(bits, (4, 8), "activation")
    if not x.is_floating_point():
        raise TypeError(f"stq.fused_quantize expects a floating-point activation, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"stq.fused_quantize needs a non-empty last dimension, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if norm_weight is not None and rms_eps is None:
        raise ValueError("stq.fused_quantize: a norm weight needs the RMSNorm (rms_eps)")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"stq.fused_quantize: norm weight must have shape ({k},), got {tuple(norm_weight.shape)}")
    if (tac_m is None) != (tac_d is None):
        raise ValueError("stq.fused_quantize: TAC takes both M and d")
    tac_group = 0
    if tac_m is not None:
        tac_ops._check_tac_args(x, tac_m, tac_d)
        tac_group = tac_m.shape[1]
    if inv_smooth is not None and inv_smooth.shape != (k,):
        raise ValueError(f"stq.fused_quantize: inv_smooth must have shape ({k},), got {tuple(inv_smooth.shape)}")
    if (p1 is None) != (p2 is None):
        raise ValueError("stq.fused_quantize: the Kronecker transform takes both factors")
    kron = None
    if p1 is not None:
        if p1.dim() != 2 or p1.shape[0] != p1.shape[1] or p2.dim() != 2 or p2.shape[0] != p2.shape[1]:
            raise ValueError(f"stq.fused_quantize: factors must be square, got {tuple(p1.shape)} and {tuple(p2.shape)}")
        if p1.shape[0] * p2.shape[0] != k:
            raise ValueError(f"stq.fused_quantize: factors {p1.shape[0]}x{p2.shape[0]} do not match {k} features")
        kron = (p1.shape[0], p2.shape[0])
        if bits == 4 and pack and kron[0] > 1 and kron[1] % 2:
            # the kernel packs neighbouring codes of one row of the [d1, d2] token matrix
            raise ValueError(f"stq.fused_quantize: 4-bit packing after a Kronecker transform needs an even d2, got {kron}")
    if (gate_masked is None) != (gate_unmasked is None):
        raise ValueError("stq.fused_quantize takes both state gates or neither")
    if gate_masked is not None:
        if is_masked is None or is_masked.dtype != torch.bool:
            raise ValueError("stq.fused_quantize: state gates need the token state is_masked (a bool tensor)")
        if gate_masked.shape != (k,) or gate_unmasked.shape != (k,):
            raise ValueError(f"stq.fused_quantize: gates must have shape ({k},)")
        if is_masked.numel() * k != x.numel():
            raise ValueError(f"stq.fused_quantize: token state {tuple(is_masked.shape)} does not match tokens {tuple(x.shape[:-1])}")
    return FusedQuantizeSpec(
        features=k, bits=bits, rms_norm=rms_eps is not None, norm_weight=norm_weight is not None,
        tac_group=tac_group, smooth=inv_smooth is not None, kron=kron, gate=gate_masked is not None,
        pack=bool(pack),
    )


def fused_quantize_reference(
    x: torch.Tensor,
    bits: int,
    norm_weight: Optional[torch.Tensor] = None,
    rms_eps: Optional[float] = None,
    tac_m: Optional[torch.Tensor] = None,
    tac_d: Optional[torch.Tensor] = None,
    inv_smooth: Optional[torch.Tensor] = None,
    p1: Optional[torch.Tensor] = None,
    p2: Optional[torch.Tensor] = None,
    is_masked: Optional[torch.Tensor] = None,
    gate_masked: Optional[torch.Tensor] = None,
    gate_unmasked: Optional[torch.Tensor] = None,
    pack: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition of ``stq::fused_quantize`` (see the module docstring)."""
    h = transform_reference(x, norm_weight, rms_eps, tac_m, tac_d, inv_smooth, p1, p2)
    q, scale, zero = quantize_per_token_reference(h, bits, is_masked, gate_masked, gate_unmasked)
    return (pack_int4(q) if bits == 4 and pack else q), scale, zero


def transform_reference(x, norm_weight=None, rms_eps=None, tac_m=None, tac_d=None, inv_smooth=None, p1=None, p2=None):
    """Stages 1-4 of ``stq::fused_quantize`` (norm, TAC, smoothing, Kronecker): float32 [..., K]."""
    h = x.float()
    if rms_eps is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + rms_eps)
        if norm_weight is not None:
            h = norm_weight.float() * h
    if tac_m is not None:
        h = tac_ops.tac_block_affine_reference(h, tac_m.float(), tac_d.float())
    if inv_smooth is not None:
        h = h * inv_smooth.float()
    if p1 is not None:
        h = kron_transform_reference(h, p1, p2)
    return h


def _triton_fused():
    try:
        from stq_compiler.codegen import triton_fused
    except ImportError:  # pragma: no cover - a torch build without triton
        return None
    return triton_fused


def _interpreted_on_cpu(t: torch.Tensor) -> bool:
    """Run the Triton kernel on this CPU tensor: only when the interpreter is on (tests)."""
    kernels = _triton_fused()
    return kernels is not None and kernels.INTERPRET and t.device.type == "cpu"


@torch.library.custom_op("stq::fused_quantize", mutates_args=())
def fused_quantize(
    x: torch.Tensor,
    bits: int,
    norm_weight: Optional[torch.Tensor] = None,
    rms_eps: Optional[float] = None,
    tac_m: Optional[torch.Tensor] = None,
    tac_d: Optional[torch.Tensor] = None,
    inv_smooth: Optional[torch.Tensor] = None,
    p1: Optional[torch.Tensor] = None,
    p2: Optional[torch.Tensor] = None,
    is_masked: Optional[torch.Tensor] = None,
    gate_masked: Optional[torch.Tensor] = None,
    gate_unmasked: Optional[torch.Tensor] = None,
    pack: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[RMSNorm] → [TAC] → [smooth] → [P1 ⊗ P2] → [gate] → quantize → [pack]: (codes, scale, zero)."""
    args = (x, bits, norm_weight, rms_eps, tac_m, tac_d, inv_smooth, p1, p2, is_masked, gate_masked, gate_unmasked, pack)
    fused_quantize_spec(*args)
    if _interpreted_on_cpu(x):
        return _triton_fused().fused_quantize_triton(*args)
    return fused_quantize_reference(*args)


@fused_quantize.register_fake
def _(x, bits, norm_weight=None, rms_eps=None, tac_m=None, tac_d=None, inv_smooth=None,
      p1=None, p2=None, is_masked=None, gate_masked=None, gate_unmasked=None, pack=True):
    spec = fused_quantize_spec(x, bits, norm_weight, rms_eps, tac_m, tac_d, inv_smooth, p1, p2,
                               is_masked, gate_masked, gate_unmasked, pack)
    k = spec.features
    stat_shape = (*x.shape[:-1], 1)
    codes = (x.new_empty((*x.shape[:-1], (k + 1) // 2), dtype=torch.uint8) if spec.packed
             else x.new_empty(x.shape, dtype=torch.int8))
    return codes, x.new_empty(stat_shape, dtype=torch.float32), x.new_empty(stat_shape, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# stq::fused_linear


def linear_in_features(xq: torch.Tensor, wq: torch.Tensor) -> int:
    """K of a GEMM whose operands are int8 codes or packed bytes; packed × packed gives the even
    K = 2·bytes (an odd K's padding code is zero in the weight, so it adds nothing)."""
    if xq.dtype == torch.int8:
        return xq.shape[-1]
    if wq.dtype == torch.int8:
        return wq.shape[1]
    return 2 * xq.shape[-1]


def _check_fused_linear_args(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, residual, swiglu) -> None:
    for t, what in ((xq, "activation"), (wq, "weight")):
        if t.dtype not in (torch.int8, torch.uint8):
            raise TypeError(f"stq.fused_linear: {what} codes must be int8 (one per byte) or uint8 (packed 4-bit), got {t.dtype}")
    if xq.dim() < 1 or not (wq.dim() == 2 or (wq.dim() == 3 and wq.dtype == torch.uint8)):
        raise ValueError(f"stq.fused_linear expects a 2-D weight (or a 3-D blocked 4-bit one), got {wq.dtype} {tuple(wq.shape)}")
    n = wq.shape[0]
    k = linear_in_features(xq, wq)
    if wq.dim() == 3:
        if xq.dtype != torch.int8:
            raise ValueError("stq.fused_linear: a blocked 4-bit weight needs int8 activation codes (pack=False)")
        if wq.shape[1:] != (-(-k // BLOCK_CODES), BLOCK_CODES // 2):
            raise ValueError(f"stq.fused_linear: blocked weight {tuple(wq.shape)} does not hold {k} input features "
                             f"(expected [N, {-(-k // BLOCK_CODES)}, {BLOCK_CODES // 2}])")
    pair_packed_weight = wq.dtype == torch.uint8 and wq.dim() == 2
    widths = {xq.shape[-1] if xq.dtype == torch.int8 else None, wq.shape[1] if wq.dtype == torch.int8 else None}
    bytes_ = {xq.shape[-1] if xq.dtype == torch.uint8 else None, wq.shape[1] if pair_packed_weight else None}
    widths.discard(None)
    bytes_.discard(None)
    if len(widths) > 1 or len(bytes_) > 1 or any(b != (k + 1) // 2 for b in bytes_):
        raise ValueError(
            f"stq.fused_linear: activation {tuple(xq.shape)} {xq.dtype} and weight {tuple(wq.shape)} {wq.dtype} "
            "do not hold the same number of input features"
        )
    tokens = xq.numel() // xq.shape[-1] if xq.shape[-1] else 0
    if x_scale.numel() != tokens or x_zero.numel() != tokens:
        raise ValueError("stq.fused_linear: one activation scale and zero point per token expected")
    if w_scale.shape != (n,) or w_sum.shape != (n,):
        raise ValueError(f"stq.fused_linear: weight scale and sum must have shape ({n},)")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"stq.fused_linear: bias must have shape ({n},), got {tuple(bias.shape)}")
    if swiglu and residual is not None:
        raise ValueError("stq.fused_linear: choose SwiGLU or a residual add, not both")
    if swiglu and n % 2:
        raise ValueError(f"stq.fused_linear: SwiGLU needs the gate and up rows concatenated (even N), got N={n}")
    out_n = n // 2 if swiglu else n
    if residual is not None and (residual.shape[-1] != out_n or residual.numel() != tokens * out_n):
        raise ValueError(f"stq.fused_linear: residual {tuple(residual.shape)} does not match the output [{tokens}, {out_n}]")


def fused_linear_reference(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    swiglu: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The definition of ``stq::fused_linear`` (see the module docstring)."""
    k = linear_in_features(xq, wq)
    y = quantized_linear_reference(codes_of(xq, k), x_scale, x_zero, weight_codes(wq, k), w_scale, w_sum, bias, torch.float32)
    if swiglu:
        h = y.shape[-1] // 2
        y = F.silu(y[..., :h]) * y[..., h:]
    if residual is not None:
        y = y + residual.float().reshape(y.shape)
    return y.to(out_dtype)


@torch.library.custom_op("stq::fused_linear", mutates_args=())
def fused_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    swiglu: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``stq.quantized_linear`` on int8 or packed 4-bit codes, then [SwiGLU | + residual]."""
    args = (xq, x_scale, x_zero, wq, w_scale, w_sum, bias, residual, swiglu, out_dtype)
    _check_fused_linear_args(*args[:-1])
    if _interpreted_on_cpu(xq):
        return _triton_fused().fused_linear_triton(*args)
    return fused_linear_reference(*args)


@fused_linear.register_fake
def _(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, residual, swiglu, out_dtype):
    _check_fused_linear_args(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, residual, swiglu)
    n = wq.shape[0] // 2 if swiglu else wq.shape[0]
    return xq.new_empty((*xq.shape[:-1], n), dtype=out_dtype)


_kernels = _triton_fused()
if _kernels is not None:
    _kernels.register_cuda_kernels()
