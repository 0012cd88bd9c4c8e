"""What a calibrated method does at one activation site, independent of any graph.

Every method in this project (RTN, SmoothQuant, QuaRot, STaR-Quant and its ablations) is a
per-site invertible change of basis folded into the site's weights, then quantization:

    x  ──[fold_norm: read the normalised tensor n, x = n·w]──► n
       ──[smooth: ÷ s]──► x' ──[P = P1 ⊗ P2]──► x'' ──[gate of the token's state]──► Q_a
    W  ──► W'' = W · diag(w if fold_norm) · diag(s) · (P1 ⊗ P2)  ──► Q_w (once)

so that ``x Wᵀ = x'' W''ᵀ`` exactly in float (for gates, when a state puts no energy in the
other state's private columns). SmoothQuant is ``smooth``; QuaRot is ``fold_norm`` plus random
signs in ``smooth`` and Hadamard factors in ``P``; STaR-Quant's SGAT is a learned ``P`` plus
state gates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from stq_compiler.calibration.transforms import kron_apply
from stq_compiler.ops import CHUNK_ROWS, kron_transform_reference, state_gate


@dataclass
class SiteTransform:
    fold_norm: bool = False
    smooth: Optional[torch.Tensor] = None  # [K]
    p1: Optional[torch.Tensor] = None  # [d1, d1]
    p2: Optional[torch.Tensor] = None  # [d2, d2], d1 * d2 = K
    gate_masked: Optional[torch.Tensor] = None  # [K] of 0/1, used by masked tokens
    gate_unmasked: Optional[torch.Tensor] = None  # [K] of 0/1, used by unmasked tokens

    RECIPE_FIELDS = ("smooth", "p1", "p2", "gate_masked", "gate_unmasked")

    @property
    def has_rotation(self) -> bool:
        return self.p1 is not None

    @property
    def has_gates(self) -> bool:
        return self.gate_masked is not None

    def check(self, features: int, where: str) -> None:
        """Refuse a transform that does not fit a site of ``features`` input features."""
        if self.smooth is not None and self.smooth.shape != (features,):
            raise ValueError(f"{where}: smoothing vector has shape {tuple(self.smooth.shape)}, the site has {features} features")
        if (self.p1 is None) != (self.p2 is None):
            raise ValueError(f"{where}: a Kronecker transform needs both factors")
        if self.p1 is not None and self.p1.shape[0] * self.p2.shape[0] != features:
            raise ValueError(
                f"{where}: transform factors {tuple(self.p1.shape)} ⊗ {tuple(self.p2.shape)} do not fit {features} features"
            )
        if (self.gate_masked is None) != (self.gate_unmasked is None):
            raise ValueError(f"{where}: state gates come in pairs")
        if self.gate_masked is not None and (self.gate_masked.shape != (features,) or self.gate_unmasked.shape != (features,)):
            raise ValueError(f"{where}: gates must have shape ({features},)")

    def fold_weight(self, w_nk: torch.Tensor, norm_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``W'' = W · diag(norm) · diag(s) · (P1 ⊗ P2)`` in float64, returned as float32; rows
        are independent, so they are folded ``CHUNK_ROWS`` at a time (an 8B LM head in float64 at
        once would take 4 GB)."""
        if self.fold_norm and norm_weight is None:
            raise ValueError("fold_norm needs the norm weight feeding the site")
        dev = w_nk.device
        norm = norm_weight.detach().double() if self.fold_norm else None
        smooth = self.smooth.double().to(dev) if self.smooth is not None else None
        p1, p2 = (self.p1.double().to(dev), self.p2.double().to(dev)) if self.p1 is not None else (None, None)
        out = torch.empty(w_nk.shape, dtype=torch.float32, device=dev)
        for start in range(0, w_nk.shape[0], CHUNK_ROWS):
            w = w_nk[start : start + CHUNK_ROWS].detach().double()
            if norm is not None:
                w = w * norm
            if smooth is not None:
                w = w * smooth
            if p1 is not None:
                w = kron_apply(w, p1, p2)
            out[start : start + CHUNK_ROWS] = w
        return out

    def transform_activation(self, x: torch.Tensor, is_masked: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x''`` (gated when the transform has gates) for an activation that already had its norm
        weight removed if ``fold_norm``. Float32 arithmetic, as in the graph."""
        x, dev = x.float(), x.device
        if self.smooth is not None:
            x = x / self.smooth.float().to(dev)
        if self.p1 is not None:
            x = kron_transform_reference(x, self.p1.to(dev), self.p2.to(dev))
        if self.has_gates:
            x = x * state_gate(is_masked.to(dev), self.gate_masked.to(dev), self.gate_unmasked.to(dev), x.shape)
        return x

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.RECIPE_FIELDS if getattr(self, name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], fold_norm: bool) -> "SiteTransform":
        unknown = set(tensors) - set(cls.RECIPE_FIELDS)
        if unknown:
            raise ValueError(f"unknown site transform tensors {sorted(unknown)}")
        return cls(fold_norm=fold_norm, **tensors)
