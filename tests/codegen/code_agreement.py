"""How the activation kernels' codes are held against ``stq::fused_quantize``'s reference.

Without float stages (gate and quantize only) the kernels must be bit-exact. With them (norm,
TAC, Kronecker) the kernels' float32 values differ from the reference's by summation order
(~1e-7 relative) and by the Kronecker stage's bf16x3 dots (``triton_fused._dot_f32``): splitting a
float32 operand into bfloat16 hi + lo leaves at most 2^-18 of it and the lo·lo product is
dropped, so a product is off by at most 3·2^-18 ≈ 1.1e-5 of its magnitude, and the two chained
dots by ≈ 2.3e-5 of the magnitude of their terms. Required:

* scales within ``SCALE_RTOL`` = 5e-5 relative (that bound, with a factor two for an extreme
  value whose terms partly cancel), zero points within one;
* a code that differs from the reference's (compared as ``code - zero``, so that a zero point
  off by one is not counted twice) differs by one, and only where the reference's ``v / scale``
  lies within ``2·SCALE_RTOL·max|v / scale|`` of its token of a rounding tie (0.0016 of a level
  at 4 bits, 0.026 at 8): where the float error can move it across. Codes clamped at the ends of
  the range under a zero point off by one are exempt. A wrong column, gate or scale moves codes
  far from ties, and fails.
"""

from __future__ import annotations

from stq_compiler import fused_ops, ops

SCALE_RTOL = 5e-5


def reference_values(x, norm_weight=None, rms_eps=None, tac_m=None, tac_d=None, inv_smooth=None,
                     p1=None, p2=None, is_masked=None, gate_masked=None, gate_unmasked=None):
    """The reference's float32 values just before rounding (stages 1-4, then the state gate),
    [tokens, K]; takes ``fused_quantize``'s keyword arguments."""
    h = fused_ops.transform_reference(x, norm_weight, rms_eps, tac_m, tac_d, inv_smooth, p1, p2)
    if gate_masked is not None:
        h = h * ops.state_gate(is_masked, gate_masked, gate_unmasked, h.shape)
    return h.reshape(-1, h.shape[-1])


def code_agreement(got, want, values, k: int, bits: int) -> tuple[bool, dict]:
    """(ok, numbers) for the kernel's (codes, scales, zero points) ``got`` against the reference's
    ``want``; ``values``: ``reference_values`` of the same inputs. See the module docstring."""
    (q, scale, zero), (q_ref, scale_ref, zero_ref) = [tuple(t.cpu() for t in g) for g in (got, want)]
    if q.dtype != q_ref.dtype or q.shape != q_ref.shape or scale.shape != scale_ref.shape or zero.shape != zero_ref.shape:
        return False, {"shapes": f"{tuple(q.shape)} {q.dtype} against {tuple(q_ref.shape)} {q_ref.dtype}"}
    codes = fused_ops.codes_of(q, k).int().reshape(-1, k)
    codes_ref = fused_ops.codes_of(q_ref, k).int().reshape(-1, k)
    zero, zero_ref = zero.reshape(-1, 1), zero_ref.reshape(-1, 1)
    scale, scale_ref = scale.reshape(-1, 1).double(), scale_ref.reshape(-1, 1).double()
    scale_rel = ((scale - scale_ref).abs() / scale_ref).max().item()
    zero_diff = (zero - zero_ref).abs().max().item()
    rounded, rounded_ref = codes - zero, codes_ref - zero_ref
    moved = rounded != rounded_ref
    t = values.cpu().double().reshape(-1, k) / scale_ref
    tie_distance = (t - t.floor() - 0.5).abs()
    near_tie = tie_distance <= 2 * SCALE_RTOL * t.abs().amax(dim=-1, keepdim=True)
    qmin, qmax = ops.act_qrange(bits)
    clamped = ((codes == qmin) | (codes == qmax) | (codes_ref == qmin) | (codes_ref == qmax)) & (zero != zero_ref)
    unexplained = moved & ~near_tie & ~clamped
    numbers = {
        "codes_identical": (codes == codes_ref).double().mean().item(),
        "max_code_diff": (codes - codes_ref).abs().max().item(),
        "codes_moved": int(moved.sum()),
        "unexplained": int(unexplained.sum()),
        "scale_rel": scale_rel,
        "zero_diff": zero_diff,
    }
    ok = (scale_rel <= SCALE_RTOL and zero_diff <= 1 and (rounded - rounded_ref).abs().max().item() <= 1
          and not unexplained.any())
    return ok, numbers
