"""TAC fit: the closed-form block-diagonal affine map that corrects the quantized attention output.

At the TAC point (attention core output, heads merged, width C) the calibration run collects
``Z_ref`` (quantizers off) and ``Ẑ`` (quantizers on). Per block b of g channels (METHOD.md §4):

1. means ``μ_ref, μ_q`` and population covariances ``Σ_ref, Σ_q``;
2. damping ``λ = rho · max(tr(Σ_q)/g, 1e-8)``, ``Σ̃_q = Σ_q + λI``;
3. ``M = Σ_ref^{1/2} Σ̃_q^{-1/2}`` by symmetric eigendecomposition, eigenvalues clamped at ``eig_floor``;
4. singular values smoothed: ``M = U diag(σ) Vᵀ``, ``σ ← (1 - eta) σ + eta · mean(σ)``;
5. shrunk toward identity: ``M ← (1 - alpha) M + alpha I``;
6. ``d = μ_ref − M μ_q``.

Applied as ``Z_b ← Ẑ_b M_bᵀ + d_b`` by ``stq::tac_block_affine``. Everything is computed in
float64, all blocks at once (batched linear algebra); the result is stored in float32.

The map matches moments; it does not minimise the error ``‖z_ref − (M ẑ + d)‖²``, and on a block
where Ẑ is already close to Z_ref it can raise that error. With the cross-covariance of the paired
tokens the calibration error of any ``(M, d = μ_ref − M μ_q)`` is closed-form, ``tr Σ_ref −
2 tr(M Σ_qr) + tr(M Σ_q Mᵀ)`` (d removes the mean term), against ``tr Σ_ref + tr Σ_q − 2 tr Σ_qr +
‖μ_ref − μ_q‖²`` for the identity; ``keep_where_better`` keeps the fitted map only on the blocks
where it is the lower (an engineering choice, METHOD.md §3.4's latitude).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

DEFAULT_GROUP = 16


def tac_group_size(channels: int, max_group: int = DEFAULT_GROUP) -> int:
    """The block size g: the largest divisor of ``channels`` that is at most ``max_group``."""
    if channels < 1 or max_group < 1:
        raise ValueError(f"tac_group_size needs positive channels and max_group, got {channels} and {max_group}")
    return next(g for g in range(min(channels, max_group), 0, -1) if channels % g == 0)


@dataclass
class TacParams:
    """One layer's TAC map: ``M`` [C//g, g, g] and ``d`` [C] (float32 unless asked otherwise)."""

    M: torch.Tensor
    d: torch.Tensor

    def __post_init__(self):
        if self.M.dim() != 3 or self.M.shape[1] != self.M.shape[2]:
            raise ValueError(f"TacParams: M must have shape [C//g, g, g], got {tuple(self.M.shape)}")
        if self.d.shape != (self.M.shape[0] * self.M.shape[1],):
            raise ValueError(
                f"TacParams: d must have shape ({self.M.shape[0] * self.M.shape[1]},) to match M "
                f"{tuple(self.M.shape)}, got {tuple(self.d.shape)}"
            )

    @property
    def group(self) -> int:
        return self.M.shape[1]

    @property
    def channels(self) -> int:
        return self.d.shape[0]

    @property
    def nbytes(self) -> int:
        return self.M.numel() * self.M.element_size() + self.d.numel() * self.d.element_size()

    @classmethod
    def identity(cls, channels: int, group: Optional[int] = None) -> "TacParams":
        group = tac_group_size(channels) if group is None else group
        _check_group(channels, group)
        eye = torch.eye(group, dtype=torch.float32).expand(channels // group, group, group).clone()
        return cls(eye, torch.zeros(channels, dtype=torch.float32))


def _check_group(channels: int, group: int) -> None:
    if group < 1 or channels % group:
        raise ValueError(f"TAC block size {group} does not divide the {channels} channels")


def _sym_power(cov: torch.Tensor, power: float, floor: float) -> torch.Tensor:
    """``cov^power`` of a batch of symmetric matrices, eigenvalues clamped at ``floor``."""
    w, v = torch.linalg.eigh(cov)
    return (v * w.clamp(min=floor).pow(power).unsqueeze(-2)) @ v.transpose(-1, -2)


class TacStatistics:
    """Streaming per-block first and second moments of ``Z_ref`` and ``Ẑ`` (float64).

    Sums are taken around a per-channel shift (the first batch's mean) so that ``E[xxᵀ] − μμᵀ``
    does not cancel catastrophically when the means are large against the spread. Tokens added as
    pairs (``update``) also accumulate the cross-covariance ``Cov(Ẑ, Z_ref)`` that the calibration
    error needs (``calibration_error``).
    """

    def __init__(self, channels: int, group: Optional[int] = None):
        self.channels = channels
        self.group = tac_group_size(channels) if group is None else group
        _check_group(channels, self.group)
        self._count: dict[str, int] = {}
        self._shift: dict[str, torch.Tensor] = {}
        self._sum: dict[str, torch.Tensor] = {}
        self._outer: dict[str, torch.Tensor] = {}

    def _blocks(self, z: torch.Tensor, what: str) -> torch.Tensor:
        if z.shape[-1] != self.channels:
            raise ValueError(f"TAC statistics: {what} has {z.shape[-1]} channels, expected {self.channels}")
        device = next(iter(self._shift.values())).device if self._shift else z.device
        return z.detach().reshape(-1, self.channels).to(device=device, dtype=torch.float64)

    def update(self, z_ref: torch.Tensor, z_q: torch.Tensor) -> None:
        """Add tokens: ``z_ref`` and ``z_q`` [..., C], the same tokens with quantizers off / on."""
        if z_ref.shape != z_q.shape:
            raise ValueError(
                f"TAC statistics: z_ref {tuple(z_ref.shape)} and z_q {tuple(z_q.shape)} must hold the same tokens"
            )
        self.add("ref", z_ref)
        self.add("q", z_q)
        if z_ref.numel() == 0:
            return
        nb, g = self.channels // self.group, self.group
        xr = (self._blocks(z_ref, "z_ref") - self._shift["ref"]).reshape(-1, nb, g)
        xq = (self._blocks(z_q, "z_q") - self._shift["q"]).reshape(-1, nb, g)
        if "qr" not in self._outer:
            self._outer["qr"] = xq.new_zeros(nb, g, g)
        self._outer["qr"] += torch.einsum("tbi,tbj->bij", xq, xr)
        self._count["qr"] = self._count.get("qr", 0) + xr.shape[0]

    def add(self, key: str, z: torch.Tensor) -> None:
        """Add tokens to one side (``"ref"`` or ``"q"``): calibration runs the two graphs apart."""
        if key not in ("ref", "q"):
            raise ValueError(f"TAC statistics: side must be 'ref' or 'q', got {key!r}")
        x = self._blocks(z, "z_ref" if key == "ref" else "z_q")
        if x.shape[0] == 0:
            return
        nb, g = self.channels // self.group, self.group
        if key not in self._shift:
            self._shift[key] = x.mean(0)
            self._sum[key] = x.new_zeros(nb, g)
            self._outer[key] = x.new_zeros(nb, g, g)
        xb = (x - self._shift[key]).reshape(-1, nb, g)
        self._sum[key] += xb.sum(0)
        self._outer[key] += torch.einsum("tbi,tbj->bij", xb, xb)
        self._count[key] = self._count.get(key, 0) + x.shape[0]

    @property
    def count(self) -> int:
        return self._count.get("ref", 0)

    def moments(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block mean [C//g, g] and population covariance [C//g, g, g] of ``"ref"`` or ``"q"``."""
        count = self._count.get(key, 0)
        if count == 0:
            raise ValueError(f"TAC statistics: no tokens were collected for {key!r}")
        mean_shifted = self._sum[key] / count
        cov = self._outer[key] / count - mean_shifted.unsqueeze(-1) * mean_shifted.unsqueeze(-2)
        mean = mean_shifted + self._shift[key].reshape_as(mean_shifted)
        return mean, (cov + cov.transpose(-1, -2)) / 2

    def cross_covariance(self) -> torch.Tensor:
        """Per-block ``Cov(Ẑ, Z_ref)`` [C//g, g, g] (rows: Ẑ's channels), of tokens added as pairs."""
        count = self._count.get("qr", 0)
        if count == 0 or count != self._count.get("ref") or count != self._count.get("q"):
            raise ValueError("TAC statistics: the cross-covariance needs every token added as a pair (update)")
        mean_r = self._sum["ref"] / count
        mean_q = self._sum["q"] / count
        return self._outer["qr"] / count - mean_q.unsqueeze(-1) * mean_r.unsqueeze(-2)

    def calibration_error(self, params: TacParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block, the mean squared error ``E‖z_ref − (M ẑ + d)‖²`` on the collected tokens with
        ``params``' M (and ``d = μ_ref − M μ_q``, which ``fit`` sets), and with the identity map."""
        mu_ref, cov_ref = self.moments("ref")
        mu_q, cov_q = self.moments("q")
        cov_qr = self.cross_covariance()
        m = params.M.to(cov_q)
        trace = lambda a: a.diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
        fitted = trace(cov_ref) - 2 * trace(m @ cov_qr) + trace(m @ cov_q @ m.transpose(-1, -2))
        identity = trace(cov_ref) + trace(cov_q) - 2 * trace(cov_qr) + (mu_ref - mu_q).pow(2).sum(-1)
        return fitted, identity

    def keep_where_better(self, params: TacParams) -> tuple[TacParams, torch.Tensor]:
        """``params`` with the identity (M = I, d = 0) on every block where the fitted map's
        calibration error is not lower than the identity's; and which blocks kept the fit."""
        fitted, identity = self.calibration_error(params)
        keep = (fitted < identity).cpu()
        g = self.group
        eye = torch.eye(g, dtype=params.M.dtype)
        m = torch.where(keep[:, None, None], params.M, eye)
        d = torch.where(keep[:, None], params.d.reshape(-1, g), torch.zeros((), dtype=params.d.dtype)).reshape(-1)
        return TacParams(m, d), keep

    def fit(
        self,
        rho: float = 3e-4,
        eta: float = 0.15,
        alpha: float = 0.55,
        eig_floor: float = 1e-12,
        dtype: torch.dtype = torch.float32,
    ) -> TacParams:
        """The closed-form TAC map of the collected tokens (module docstring, steps 2-6), stored in
        ``dtype`` on the CPU (float32, what the graph holds; float64 to check the fit itself)."""
        mu_ref, cov_ref = self.moments("ref")
        mu_q, cov_q = self.moments("q")
        g = self.group
        eye = torch.eye(g, dtype=torch.float64, device=cov_q.device)
        trace = cov_q.diagonal(dim1=-2, dim2=-1).sum(-1)
        damping = rho * torch.clamp(trace / g, min=1e-8)
        cov_q = cov_q + damping[:, None, None] * eye
        m = _sym_power(cov_ref, 0.5, eig_floor) @ _sym_power(cov_q, -0.5, eig_floor)
        u, s, vh = torch.linalg.svd(m)
        s = (1 - eta) * s + eta * s.mean(-1, keepdim=True)
        m = (u * s.unsqueeze(-2)) @ vh
        m = (1 - alpha) * m + alpha * eye
        d = mu_ref - (m @ mu_q.unsqueeze(-1)).squeeze(-1)
        return TacParams(m.to(dtype).cpu(), d.reshape(-1).to(dtype).cpu())


def fit_tac(
    z_ref: torch.Tensor,
    z_q: torch.Tensor,
    group: Optional[int] = None,
    rho: float = 3e-4,
    eta: float = 0.15,
    alpha: float = 0.55,
    eig_floor: float = 1e-12,
    dtype: torch.dtype = torch.float32,
) -> TacParams:
    """Fit TAC on ``z_ref`` / ``z_q`` [..., C] (quantizers off / on at the TAC point), all tokens at
    once; ``TacStatistics`` does the same from batches."""
    stats = TacStatistics(z_ref.shape[-1], group)
    stats.update(z_ref, z_q)
    return stats.fit(rho=rho, eta=eta, alpha=alpha, eig_floor=eig_floor, dtype=dtype)
