"""Activation transforms that a linear absorbs exactly: rotations and per-channel smoothing.

A linear ``Y = X Wᵀ`` is unchanged by ``X → X P``, ``W → W P`` for any orthogonal ``P``, and by
``X → X diag(1/s)``, ``W → W diag(s)`` for any positive ``s``; the transform only moves the
quantization difficulty between activations and weights. This module builds those matrices:

* ``hadamard_matrix`` / ``random_hadamard`` / ``random_orthogonal``: the rotations of QuaRot and
  the random initialisation of STaR-Quant's SGAT basis (METHOD.md sections 3 and 6).
* ``kronecker_factors`` / ``kron_apply``: a rotation ``P = P₁ ⊗ P₂`` with ``d₁ ≈ d₂ ≈ √d``
  applied as two small matmuls, never forming the ``d × d`` product (METHOD.md 3.4).
* ``smoothquant_scales``: SmoothQuant's per-channel migration strength.

Random matrices are drawn on the generator's device (CPU without one) in float64 and then cast,
so one seed gives the same matrix whatever ``dtype`` is asked for.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _device_of(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order ``n`` (a power of two), scaled by ``1/√n`` to be orthogonal.

    Entries ``±1/√n``; the matrix is symmetric, so it is its own inverse.
    """
    if not _is_power_of_two(n):
        raise ValueError(f"hadamard_matrix: Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return (h / math.sqrt(n)).to(dtype)


def random_orthogonal(
    n: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """A Haar-random orthogonal ``n × n`` matrix: QR of a Gaussian, columns' signs fixed by ``diag(R)``.

    Without the sign fix QR's sign convention would bias the distribution (Mezzadri, 2007).
    """
    if n < 1:
        raise ValueError(f"random_orthogonal: size must be positive, got {n}")
    g = torch.randn(n, n, generator=generator, dtype=torch.float64, device=_device_of(generator))
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    # QR returns column-major storage; hand out a contiguous matrix (torch.kron rejects some strides).
    return (q * signs[None, :]).to(dtype).contiguous()


def random_hadamard(
    n: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """QuaRot's randomized Hadamard ``H · diag(±1)``, orthogonal, for any size ``n``.

    For ``n`` a power of two: the normalized Sylvester matrix with randomly flipped columns.
    For ``n = 2^k · m`` with ``m > 1`` odd: ``kron(H_rand(2^k), Q_m)`` with ``Q_m`` a random
    orthogonal ``m × m``. QuaRot instead hard-codes Hadamard matrices of orders 12, 20, 28, ...
    for the odd part; a random orthogonal factor is the choice here because it exists for every
    ``m``, needs no tables, and the odd part of the model widths in use is small (3, 7, 37, 43),
    so the lost ``±1/√n`` flatness is confined to a small dense block. The Kronecker product of
    two orthogonal matrices is orthogonal, so the result always is.
    """
    if n < 1:
        raise ValueError(f"random_hadamard: size must be positive, got {n}")
    odd = n
    while odd % 2 == 0:
        odd //= 2
    pow2 = n // odd
    device = _device_of(generator)
    signs = torch.randint(0, 2, (pow2,), generator=generator, device=device).to(torch.float64)
    signs = signs * 2 - 1
    h = hadamard_matrix(pow2, device=device) * signs[None, :]
    if odd > 1:
        h = torch.kron(h, random_orthogonal(odd, generator=generator))
    return h.to(dtype)


def kronecker_factors(d: int) -> tuple[int, int]:
    """``(d1, d2)`` with ``d1 * d2 == d``, ``d1 <= d2``, ``d1`` the largest divisor of ``d`` not above ``√d``.

    E.g. 4096 → (64, 64), 12288 → (96, 128), 3584 → (56, 64), 18944 → (128, 148); a prime → (1, d).
    """
    if d < 1:
        raise ValueError(f"kronecker_factors: dimension must be positive, got {d}")
    d1 = math.isqrt(d)
    while d % d1:
        d1 -= 1
    return d1, d // d1


def kron_apply(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """``x @ torch.kron(p1, p2)`` for ``x`` [..., d1·d2], without forming the Kronecker product.

    ``kron(p1, p2)[a·d2 + b, c·d2 + e] = p1[a, c] · p2[b, e]``, so with ``X = x.reshape(..., d1, d2)``
    (row-major: feature ``a·d2 + b`` is ``X[a, b]``) the product is ``p1ᵀ X p2``, flattened back.
    Cost per row: ``d·(d1 + d2)`` multiply-adds instead of ``d²``.
    """
    d1, d2 = p1.shape[-1], p2.shape[-1]
    if p1.shape != (d1, d1) or p2.shape != (d2, d2):
        raise ValueError(f"kron_apply expects square factors, got {tuple(p1.shape)} and {tuple(p2.shape)}")
    if x.shape[-1] != d1 * d2:
        raise ValueError(f"kron_apply: last dimension {x.shape[-1]} is not {d1} * {d2}")
    xm = x.reshape(*x.shape[:-1], d1, d2)
    return (p1.t() @ xm @ p2).reshape(x.shape)


def smoothquant_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant's per-input-channel scales ``s_j = max|X_j|^α / max|W_j|^(1-α)``.

    Fold as ``X → X diag(1/s)``, ``W → W diag(s)`` (``weight_absmax[j]`` is the max over output
    channels of input column ``j``). A channel with zero (or non-finite) activation or weight
    statistics carries nothing to migrate and gets ``s = 1``; the rest are clamped to
    ``[eps, 1/eps]`` so neither side's range blows up. Computed in float64, returned in
    ``act_absmax``'s floating dtype.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant_scales: alpha must lie in [0, 1], got {alpha}")
    if act_absmax.shape != weight_absmax.shape or act_absmax.dim() != 1:
        raise ValueError(
            "smoothquant_scales expects two [K] vectors, got "
            f"{tuple(act_absmax.shape)} and {tuple(weight_absmax.shape)}"
        )
    a = act_absmax.detach().to(torch.float64).abs()
    w = weight_absmax.detach().to(device=a.device, dtype=torch.float64).abs()
    usable = (a > 0) & (w > 0) & torch.isfinite(a) & torch.isfinite(w)
    a1 = torch.where(usable, a, torch.ones_like(a))
    w1 = torch.where(usable, w, torch.ones_like(w))
    s = (a1.pow(alpha) / w1.pow(1.0 - alpha)).clamp(min=eps, max=1.0 / eps)
    s = torch.where(usable, s, torch.ones_like(s))
    out_dtype = act_absmax.dtype if act_absmax.is_floating_point() else torch.float32
    return s.to(out_dtype)
