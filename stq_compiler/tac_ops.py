"""``stq::tac_block_affine``: the TAC map ``Z_b ← Z_b M_bᵀ + d_b`` per block b of g channels.

``z`` [..., C], ``M`` [C//g, g, g], ``d`` [C]. Computed in float32 (float64 for a float64 ``z``)
and cast back to ``z``'s dtype. With ``M = I`` and ``d = 0`` it returns ``z`` exactly: each output
is ``z_i·1`` plus products with 0, all exact.

The reference is a batched matmul over the blocks; this op (the unfused graph) runs it as is on
CUDA too. The fused graph's ``stq::fused_quantize`` runs TAC as a Triton kernel on CUDA
(``codegen/triton_fused.tac_affine_triton``).
"""

from __future__ import annotations

import torch


def _check_tac_args(z: torch.Tensor, M: torch.Tensor, d: torch.Tensor) -> None:
    if not z.is_floating_point() or not M.is_floating_point() or not d.is_floating_point():
        raise TypeError(f"stq.tac_block_affine expects floating-point z, M, d, got {z.dtype}, {M.dtype}, {d.dtype}")
    if z.dim() < 1:
        raise ValueError("stq.tac_block_affine expects z with a channel dimension [..., C], got a scalar")
    if M.dim() != 3 or M.shape[1] != M.shape[2] or M.shape[1] == 0:
        raise ValueError(f"stq.tac_block_affine: M must have shape [C//g, g, g], got {tuple(M.shape)}")
    c, g = z.shape[-1], M.shape[1]
    if c % g:
        raise ValueError(f"stq.tac_block_affine: z has {c} channels, not divisible by the block size g={g}")
    if M.shape[0] * g != c:
        raise ValueError(
            f"stq.tac_block_affine: M {tuple(M.shape)} holds {M.shape[0]} blocks of {g} channels "
            f"but z has {c} channels ({c // g} blocks)"
        )
    if d.shape != (c,):
        raise ValueError(f"stq.tac_block_affine: d must have shape ({c},), got {tuple(d.shape)}")
    if M.device != z.device or d.device != z.device:
        raise ValueError(f"stq.tac_block_affine: z, M, d must be on one device, got {z.device}, {M.device}, {d.device}")


def tac_block_affine_reference(z: torch.Tensor, M: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The definition of ``stq::tac_block_affine`` (see the module docstring)."""
    compute = torch.promote_types(z.dtype, torch.float32)
    nb, g = M.shape[0], M.shape[1]
    zb = z.to(compute).reshape(-1, nb, g).transpose(0, 1)  # [nb, T, g]
    out = torch.baddbmm(d.to(compute).reshape(nb, 1, g), zb, M.to(compute).transpose(1, 2))
    return out.transpose(0, 1).reshape(z.shape).to(z.dtype).contiguous()


@torch.library.custom_op("stq::tac_block_affine", mutates_args=())
def tac_block_affine(z: torch.Tensor, M: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Block-diagonal affine map ``z_b M_bᵀ + d_b`` over blocks of ``g = M.shape[-1]`` channels."""
    _check_tac_args(z, M, d)
    return tac_block_affine_reference(z, M, d)


@tac_block_affine.register_fake
def _(z, M, d):
    _check_tac_args(z, M, d)
    return z.new_empty(z.shape)
