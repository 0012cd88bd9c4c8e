"""GPTQ: weight rounding that minimises the layer's output error instead of the weight error.

For a linear ``Y = X Wᵀ`` the layer objective of a quantized weight ``Ŵ`` is
``‖X Wᵀ - X Ŵᵀ‖²_F = tr((W - Ŵ) XᵀX (W - Ŵ)ᵀ)``, so only the Hessian ``H = 2/n XᵀX`` of the
calibration activations matters. GPTQ (Frantar et al., 2022) rounds the input columns one at a
time and pushes each column's rounding error onto the columns not yet rounded, weighted by the
inverse Hessian; the inverse is taken once, through the upper Cholesky factor of
``(H + λI)⁻¹``, and updates to later columns are applied lazily, one block of columns at a time.

What this module produces is an ordinary ``stq_compiler.ops.QuantizedWeight``: the per-channel
scales are the round-to-nearest scales of the original weight (``max|w| / qmax``), fixed before
any column is rounded, so the codes stay in ``[-qmax, qmax]`` and GPTQ weights dequantize — and
run through ``stq.quantized_linear`` — exactly like RTN weights. Only the codes differ.
"""

from __future__ import annotations

import torch

from stq_compiler.ops import QuantizedWeight, _round_half_up, quantize_weight, weight_qmax


class HessianAccumulator:
    """Streams ``H = 2/n Σ xᵀx`` over calibration batches of a linear's input, in float64.

    ``update(x)`` takes activations ``[..., in_features]`` (any leading shape; every row is one
    sample, so ``n`` counts tokens). The sum lives on the device of the first batch.
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.n = 0
        self._xtx: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"HessianAccumulator expects {self.in_features} input features, got shape {tuple(x.shape)}"
            )
        x = x.detach().reshape(-1, self.in_features)
        if self._xtx is None:
            self._xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=x.device)
        x = x.to(device=self._xtx.device, dtype=torch.float64)
        self._xtx.addmm_(x.t(), x)
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``2/n XᵀX`` [K, K] float64 over every row seen so far."""
        if self.n == 0:
            raise ValueError("HessianAccumulator.hessian(): no activations were accumulated")
        return self._xtx * (2.0 / self.n)


def _upper_cholesky_of_damped_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹``, ``λ = damp · mean(diag H)``, in float64.

    Row ``i`` of ``U`` (right of the diagonal) is the error-feedback row of column ``i`` once the
    columns before it are rounded; ``U_ii²`` is that column's inverse-Hessian diagonal.
    A Hessian that is not positive definite even after damping (rank-deficient calibration
    data in float rounding) gets ten times more damping, a few times, before giving up.
    """
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    lam = damp * torch.diagonal(h).mean()
    for _ in range(6):
        l_factor, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            h_inv = torch.cholesky_inverse(l_factor)
            u_factor, info = torch.linalg.cholesky_ex(h_inv, upper=True)
            if int(info) == 0:
                return u_factor
        lam = lam * 10 if lam > 0 else torch.diagonal(h).mean() * 1e-6 + 1e-12
    raise RuntimeError("gptq_quantize: the damped Hessian is not positive definite")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> QuantizedWeight:
    """Quantize ``weight`` [N, K] with GPTQ rounding under ``hessian`` [K, K] (``2/n XᵀX``).

    ``damp`` is the relative diagonal damping (fraction of the mean of ``diag H``); ``act_order``
    rounds the columns in order of decreasing ``H_ii`` (the most active inputs first, while the
    most unrounded columns remain to absorb their error). Inputs never active (``H_ii == 0``)
    get ``H_ii = 1`` and a zero weight column, as in GPTQ: nothing reads them, so their code
    only has to be harmless. The Hessian factorization runs in float64, the column sweep in
    float32, both on the weight's device.
    """
    if weight.dim() != 2:
        raise ValueError(f"gptq_quantize expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    n_out, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(
            f"gptq_quantize: hessian must be [{k}, {k}] for a weight [{n_out}, {k}], got {tuple(hessian.shape)}"
        )
    if block_size < 1:
        raise ValueError(f"gptq_quantize: block_size must be positive, got {block_size}")
    device = weight.device
    # Scales fixed from the original weight: the same dequantization as RTN (and range checks).
    scale = quantize_weight(weight, bits).scale
    qmax = weight_qmax(bits)

    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=device, dtype=torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]

    u = _upper_cholesky_of_damped_inverse(h, damp).to(torch.float32)
    scale_col = scale[:, None]
    q = torch.empty(n_out, k, dtype=torch.float32, device=device)

    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        w_blk = w[:, b0:b1].clone()
        u_blk = u[b0:b1, b0:b1]
        err_blk = torch.empty_like(w_blk)
        for i in range(b1 - b0):
            col = w_blk[:, i : i + 1]
            code = torch.clamp(_round_half_up(col / scale_col), -qmax, qmax)
            q[:, b0 + i : b0 + i + 1] = code
            err = (col - code * scale_col) / u_blk[i, i]
            # Feed the error to the rest of this block now; columns after it get it in one GEMM.
            w_blk[:, i:] -= err * u_blk[i : i + 1, i:]
            err_blk[:, i : i + 1] = err
        w[:, b1:] -= err_blk @ u[b0:b1, b1:]

    if perm is not None:
        q = q[:, torch.argsort(perm)]
    codes = q.to(torch.int8)
    return QuantizedWeight(q=codes, scale=scale, w_sum=codes.sum(dim=1, dtype=torch.int32), bits=bits)
