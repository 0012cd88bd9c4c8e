"""Quantized custom ops (namespace ``stq``) and their exact integer semantics.

Every op here has three faces: a reference implementation that runs on any device with exact
integer arithmetic (the CPU path, and the definition the Triton kernels must match), a fake
implementation for tracing, and on CUDA a Triton kernel (``stq_compiler.codegen.triton_rtn``).

Integer conventions, shared by the reference and the kernels:

* Activations, per token, asymmetric, ``b`` bits, stored signed in int8:
  ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``, ``scale = (hi - lo) / (2**b - 1)`` (float32;
  1.0 for an all-zero token), ``zero = qmin - floor(lo / scale + 0.5)``,
  ``q = clamp(floor(x / scale + 0.5) + zero, qmin, qmax)`` with ``qmin = -2**(b-1)``,
  ``qmax = 2**(b-1) - 1``. So ``x ≈ scale * (q - zero)``. Division is IEEE float32.
  NaN inputs give unspecified codes. Optional per-state gates multiply ``x`` by ``gate_masked`` or ``gate_unmasked`` (one value per
  column) before quantization, chosen per token by ``is_masked``.
* Weights, per output channel, symmetric, ``b`` bits: ``scale = max|w| / (2**(b-1) - 1)``,
  ``q = clamp(floor(w / scale + 0.5), -(2**(b-1) - 1), 2**(b-1) - 1)``, quantized once at compile
  time; ``w_sum = sum_k q`` is kept for the zero-point correction.
* The linear: ``acc = xq @ wqᵀ - x_zero * w_sum`` in int32 (exact), then
  ``y = (float(acc) * x_scale) * w_scale + bias`` in float32, cast to the output dtype.
* Embedding rows (weight-only, 8 bits): each row quantized like an 8-bit weight row
  (``scale = max|row| / 127``, 1.0 for an all-zero row; ``codes = clamp(floor(row / scale + 0.5),
  -127, 127)``); a lookup is ``float(codes[ids]) * scale[ids]`` in float32, cast to the output
  dtype. ``embedding_int8`` is plain torch (a gather and a multiply), not a custom op: Inductor
  fuses it into the kernel that reads the embedding (the first RMSNorm), where a custom op would be
  an opaque call with its float32 rows written to memory in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SUPPORTED_ACT_BITS = (4, 8)
SUPPORTED_WEIGHT_BITS = (4, 8)


def act_qrange(bits: int) -> tuple[int, int]:
    """Signed storage range of a ``bits``-bit asymmetric activation code."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def weight_qmax(bits: int) -> int:
    """Largest magnitude of a ``bits``-bit symmetric weight code."""
    return (1 << (bits - 1)) - 1


def _check_bits(bits: int, allowed: tuple[int, ...], what: str) -> None:
    if bits not in allowed:
        raise ValueError(f"{what} bit width {bits} is not supported; choose one of {allowed}")


def _round_half_up(v: torch.Tensor) -> torch.Tensor:
    # floor(v + 0.5): the same rounding in PyTorch, Triton and the interpreter (no tie-to-even).
    return torch.floor(v + 0.5)


# ----------------------------------------------------------------------------------------------
# Weights (compile time, plain functions: they run once, not in the graph)


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight quantized once: codes ``q`` [N, K] int8, ``scale`` [N] float32, ``w_sum`` [N] int32."""

    q: torch.Tensor
    scale: torch.Tensor
    w_sum: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


# Rows quantized at a time: bounds the float32 temporaries to a slice (a [126464, 4096] LLaDA-8B
# LM head or embedding table at once would take 2 GB of float32 copies on top of the weights).
CHUNK_ROWS = 8192


def quantize_weight(w: torch.Tensor, bits: int, chunk_rows: int = CHUNK_ROWS) -> QuantizedWeight:
    """Round-to-nearest, per output channel, symmetric quantization of ``w`` [N, K], ``chunk_rows``
    rows at a time (rows are independent: the result does not depend on it)."""
    _check_bits(bits, SUPPORTED_WEIGHT_BITS, "weight")
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    qmax = weight_qmax(bits)
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], chunk_rows):
        rows = w[start : start + chunk_rows].detach().float()
        s = rows.abs().amax(dim=1) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[start : start + chunk_rows] = torch.clamp(_round_half_up(rows / s[:, None]), -qmax, qmax)
        scale[start : start + chunk_rows] = s
    return QuantizedWeight(q=q, scale=scale, w_sum=q.sum(dim=1, dtype=torch.int32), bits=bits)


# ----------------------------------------------------------------------------------------------
# Embedding rows (weight-only int8; see the module docstring)

EMBEDDING_CHUNK_ROWS = CHUNK_ROWS


def quantize_embedding_rows(weight: torch.Tensor, chunk_rows: int = EMBEDDING_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise symmetric int8 quantization of an embedding table [V, D]: ``(codes int8 [V, D],
    scale float32 [V])``, the 8-bit rule of ``quantize_weight`` applied to each row."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_embedding_rows expects a 2-D floating-point table [V, D], got {weight.dtype} {tuple(weight.shape)}")
    rows = quantize_weight(weight, 8, chunk_rows=chunk_rows)
    return rows.q, rows.scale


def embedding_int8(codes: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The rows ``ids`` [...] of an int8 table: ``float(codes[ids]) * scale[ids]`` -> [..., D] in
    ``out_dtype``. Plain torch ops, so any tensor mode (fake, meta) traces it as it is."""
    return (codes[ids].float() * scale[ids].unsqueeze(-1)).to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Activations


def state_gate(is_masked: torch.Tensor, gate_masked: torch.Tensor, gate_unmasked: torch.Tensor, shape) -> torch.Tensor:
    """The per-token gate row: ``gate_masked`` for masked tokens, ``gate_unmasked`` for the rest."""
    state = is_masked.reshape(*shape[:-1], 1)
    return torch.where(state, gate_masked.float(), gate_unmasked.float())


def quantize_per_token_reference(
    x: torch.Tensor,
    bits: int,
    is_masked: Optional[torch.Tensor] = None,
    gate_masked: Optional[torch.Tensor] = None,
    gate_unmasked: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact definition of ``stq::quantize_per_token`` (see the module docstring)."""
    qmin, qmax = act_qrange(bits)
    xf = x.float()
    if gate_masked is not None:
        xf = xf * state_gate(is_masked, gate_masked, gate_unmasked, x.shape)
    lo = torch.clamp(xf.amin(dim=-1, keepdim=True), max=0.0)
    hi = torch.clamp(xf.amax(dim=-1, keepdim=True), min=0.0)
    # Divide by a tensor: CUDA turns division by a Python float into a reciprocal multiply.
    scale = (hi - lo) / torch.full_like(hi, float((1 << bits) - 1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = qmin - _round_half_up(lo / scale)
    q = torch.clamp(_round_half_up(xf / scale) + zero, qmin, qmax)
    return q.to(torch.int8), scale, zero.to(torch.int32)


def _check_quantize_args(x, bits, is_masked, gate_masked, gate_unmasked) -> None:
    _check_bits(bits, SUPPORTED_ACT_BITS, "activation")
    if not x.is_floating_point():
        raise TypeError(f"stq.quantize_per_token expects a floating-point activation, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"stq.quantize_per_token needs a non-empty last dimension, got shape {tuple(x.shape)}")
    if (gate_masked is None) != (gate_unmasked is None):
        raise ValueError("stq.quantize_per_token takes both state gates or neither")
    if gate_masked is not None:
        if is_masked is None or is_masked.dtype != torch.bool:
            raise ValueError("stq.quantize_per_token: state gates need the token state is_masked (a bool tensor)")
        k = x.shape[-1]
        if gate_masked.shape != (k,) or gate_unmasked.shape != (k,):
            raise ValueError(
                f"stq.quantize_per_token: gates must have shape ({k},), got "
                f"{tuple(gate_masked.shape)} and {tuple(gate_unmasked.shape)}"
            )
        if is_masked.numel() * k != x.numel():
            raise ValueError(
                f"stq.quantize_per_token: token state of shape {tuple(is_masked.shape)} does not "
                f"match the activation's tokens {tuple(x.shape[:-1])}"
            )


@torch.library.custom_op("stq::quantize_per_token", mutates_args=())
def quantize_per_token(
    x: torch.Tensor,
    bits: int,
    is_masked: Optional[torch.Tensor] = None,
    gate_masked: Optional[torch.Tensor] = None,
    gate_unmasked: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token asymmetric quantization: returns (codes int8, scale float32 [...,1], zero int32 [...,1])."""
    _check_quantize_args(x, bits, is_masked, gate_masked, gate_unmasked)
    return quantize_per_token_reference(x, bits, is_masked, gate_masked, gate_unmasked)


@quantize_per_token.register_fake
def _(x, bits, is_masked=None, gate_masked=None, gate_unmasked=None):
    _check_quantize_args(x, bits, is_masked, gate_masked, gate_unmasked)
    stat_shape = (*x.shape[:-1], 1)
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty(stat_shape, dtype=torch.float32),
        x.new_empty(stat_shape, dtype=torch.int32),
    )


# ----------------------------------------------------------------------------------------------
# The quantized linear


def quantized_linear_reference(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The exact definition of ``stq::quantized_linear`` (see the module docstring)."""
    lead = xq.shape[:-1]
    k = xq.shape[-1]
    x2 = xq.reshape(-1, k)
    if x2.device.type == "cpu":
        # a [N, 1] weight transposed has strides (1, 1), which _int_mm misreads; reshape is exact
        acc = torch._int_mm(x2, wq.reshape(1, -1) if k == 1 else wq.t())
    else:
        # CUDA's _int_mm wants M > 16 and K, N multiples of 8, and has no int64 matmul; float64
        # products and sums of int8 codes are exact (|acc| < 2**53).
        acc = (x2.double() @ wq.double().t()).to(torch.int32)
    acc = acc - x_zero.reshape(-1, 1) * w_sum.reshape(1, -1)
    y = acc.float() * x_scale.reshape(-1, 1) * w_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*lead, wq.shape[0])


def _check_linear_args(xq, x_scale, x_zero, wq, w_scale, w_sum, bias) -> None:
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise TypeError(f"stq.quantized_linear expects int8 codes, got {xq.dtype} and {wq.dtype}")
    if wq.dim() != 2:
        raise ValueError(f"stq.quantized_linear expects a 2-D weight, got shape {tuple(wq.shape)}")
    n, k = wq.shape
    if xq.shape[-1] != k:
        raise ValueError(
            f"stq.quantized_linear: activation has {xq.shape[-1]} input features but the weight "
            f"[{n}, {k}] expects {k}"
        )
    tokens = xq.numel() // k if k else 0
    if x_scale.numel() != tokens or x_zero.numel() != tokens:
        raise ValueError("stq.quantized_linear: one activation scale and zero point per token expected")
    if w_scale.shape != (n,) or w_sum.shape != (n,):
        raise ValueError(f"stq.quantized_linear: weight scale and sum must have shape ({n},)")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"stq.quantized_linear: bias must have shape ({n},), got {tuple(bias.shape)}")


@torch.library.custom_op("stq::quantized_linear", mutates_args=())
def quantized_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``y = x_scale * w_scale * (xq @ wqᵀ - x_zero * w_sum) + bias`` with an int32 accumulator."""
    _check_linear_args(xq, x_scale, x_zero, wq, w_scale, w_sum, bias)
    return quantized_linear_reference(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, out_dtype)


@quantized_linear.register_fake
def _(xq, x_scale, x_zero, wq, w_scale, w_sum, bias, out_dtype):
    _check_linear_args(xq, x_scale, x_zero, wq, w_scale, w_sum, bias)
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)


# ----------------------------------------------------------------------------------------------
# The activation-side transform of a site: x -> x (P1 ⊗ P2)


def kron_transform_reference(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """``x @ kron(p1, p2)`` without forming the product: ``P1ᵀ X P2`` on each token's [d1, d2] view.

    A dense transform is ``p1 = P``, ``p2 = [[1]]``. Computed in float32, returned in x's dtype.
    """
    d1, d2 = p1.shape[0], p2.shape[0]
    xm = x.float().reshape(*x.shape[:-1], d1, d2)
    y = p1.float().t() @ xm @ p2.float()
    return y.reshape(x.shape).to(x.dtype)


def _check_kron_args(x, p1, p2) -> None:
    if p1.dim() != 2 or p1.shape[0] != p1.shape[1] or p2.dim() != 2 or p2.shape[0] != p2.shape[1]:
        raise ValueError(
            f"stq.kron_transform: factors must be square matrices, got {tuple(p1.shape)} and {tuple(p2.shape)}"
        )
    if p1.shape[0] * p2.shape[0] != x.shape[-1]:
        raise ValueError(
            f"stq.kron_transform: factors {p1.shape[0]}x{p2.shape[0]} do not match the activation's "
            f"{x.shape[-1]} features"
        )


@torch.library.custom_op("stq::kron_transform", mutates_args=())
def kron_transform(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """A site's activation transform ``x (P1 ⊗ P2)`` (SGAT's P, QuaRot's Hadamard)."""
    _check_kron_args(x, p1, p2)
    return kron_transform_reference(x, p1, p2)


@kron_transform.register_fake
def _(x, p1, p2):
    _check_kron_args(x, p1, p2)
    return torch.empty_like(x)


# On CUDA the ops dispatch to Triton kernels; without Triton they stay on the reference.
try:
    from stq_compiler.codegen.triton_rtn import register_cuda_kernels
except ImportError:  # pragma: no cover - a torch build without triton
    pass
else:
    register_cuda_kernels()
