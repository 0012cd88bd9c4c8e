"""SGAT: fit one site's state-guided orthogonal transform (METHOD.md section 3).

For a site with activations ``X`` (tokens × d, each token masked or not) feeding linears
``W_j``, learn an orthogonal ``P = P1 ⊗ P2`` minimising

    L = Σ_s ‖ X_s Wᵀ − Q_a(X_s P G_s) · Q_w(Pᵀ Wᵀ) ‖²_F / ‖X Wᵀ‖²_F

over both token states s, with straight-through rounding, ``P`` kept orthogonal by
``torch.nn.utils.parametrizations.orthogonal``, AdamW. The gates ``G_s`` keep the shared columns
and the state's own private ones (d/32 each; the last 2·d/32 columns of the P basis). With
``gates=False`` it is the ablation "one shared learned transform without state gates".

Gates are a bet that the two states' activations differ; where they do not, the private columns
cost each state what the other state's gate zeroes (leakage) and buy nothing. With
``gate_select`` the trained P is evaluated on all the site's calibration tokens with its gates
and with none, and the gates stay only if they give the lower loss (METHOD.md §3.4's latitude).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import orthogonal

from stq_compiler.calibration.transforms import kron_apply, kronecker_factors, random_hadamard, random_orthogonal
from stq_compiler.ops import act_qrange, weight_qmax
from stq_compiler.site_transform import SiteTransform


def private_count(d: int, fraction: float = 1 / 32) -> int:
    return max(1, int(round(d * fraction)))


def private_gates(d: int, fraction: float = 1 / 32) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 gates over the P basis: the last ``2p`` columns are private (p = max(1, d·fraction)),
    the first ``p`` of them to masked tokens, the last ``p`` to unmasked ones."""
    p = private_count(d, fraction)
    gate_masked, gate_unmasked = torch.ones(d), torch.ones(d)
    gate_masked[d - p :] = 0  # unmasked-private columns are off for masked tokens
    gate_unmasked[d - 2 * p : d - p] = 0  # masked-private columns are off for unmasked tokens
    return gate_masked, gate_unmasked


def gates_by_energy(xp: torch.Tensor, is_masked: torch.Tensor, fraction: float = 1 / 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Place the private columns of an initial basis where they cost least: the unmasked-private
    columns (off for masked tokens) where masked tokens carry the least energy, the masked-private
    ones (off for unmasked tokens) where unmasked tokens carry the least, among the rest.
    ``xp``: activations in the initial basis [T, d]. With one state absent, the fixed layout."""
    if is_masked.all() or not is_masked.any():
        return private_gates(xp.shape[-1], fraction)
    return gates_from_energy(xp[is_masked].pow(2).mean(0), xp[~is_masked].pow(2).mean(0), fraction)


def gates_from_energy(energy_m: torch.Tensor, energy_u: torch.Tensor, fraction: float = 1 / 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``gates_by_energy`` from the mean squared activation per basis column of masked tokens
    (``energy_m``) and of unmasked ones (``energy_u``)."""
    d = energy_m.shape[-1]
    p = private_count(d, fraction)
    energy_m, energy_u = energy_m.cpu(), energy_u.cpu()
    unmasked_private = torch.argsort(energy_m)[:p]
    rest = torch.ones(d, dtype=torch.bool)
    rest[unmasked_private] = False
    candidates = torch.nonzero(rest).squeeze(1)
    masked_private = candidates[torch.argsort(energy_u[candidates])[:p]]
    gate_masked, gate_unmasked = torch.ones(d), torch.ones(d)
    gate_masked[unmasked_private] = 0
    gate_unmasked[masked_private] = 0
    return gate_masked, gate_unmasked


def _state_energy(x: torch.Tensor, state: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, device, chunk: int = 65536):
    """Mean squared ``x P`` per column for masked and unmasked tokens (None for an absent state),
    in chunks: ``x`` may be far larger than the device's memory."""
    sums = {True: 0.0, False: 0.0}
    counts = {True: 0, False: 0}
    for i in range(0, x.shape[0], chunk):
        energy = kron_apply(x[i : i + chunk].to(device).float(), p1, p2).pow(2)
        s = state[i : i + chunk].to(device)
        for masked in (True, False):
            rows = s if masked else ~s
            sums[masked] = sums[masked] + energy[rows].sum(0, dtype=torch.float64)
            counts[masked] += int(rows.sum())
    return [sums[m] / counts[m] if counts[m] else None for m in (True, False)]


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.floor(x + 0.5) - x).detach()


def fake_quant_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token asymmetric quantize-dequantize (ops.py semantics), straight-through rounding."""
    qmin, qmax = act_qrange(bits)
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-12)
    zero = (qmin - torch.floor(lo / scale + 0.5)).detach()
    q = torch.clamp(_round_ste(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric quantize-dequantize, straight-through rounding."""
    qmax = weight_qmax(bits)
    scale = (w.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-12)
    return torch.clamp(_round_ste(w / scale), -qmax, qmax) * scale


class _Orthogonal(nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.clone())
        orthogonal(self, "weight")


def fit_sgat(
    x: torch.Tensor,
    is_masked: torch.Tensor,
    weights: list[torch.Tensor],
    w_bits: int,
    a_bits: int,
    *,
    gates: bool = True,
    kron: bool = True,
    epochs: int = 15,
    lr: float = 1e-3,
    tokens_per_step: int = 4 * 128,
    sequence: int = 1,
    private_fraction: float = 1 / 32,
    init: str = "hadamard",
    generator: Optional[torch.Generator] = None,
    fold_norm: bool = False,
    device: Optional[torch.device] = None,
    gate_select: bool = False,
    gate_retrain: bool = False,
) -> tuple[SiteTransform, dict]:
    """Learn the site's transform from activations ``x`` [T, d] (already divided by the norm scale
    when ``fold_norm``) and the site's folded-so-far weights ``W_j`` [N_j, d]. Training runs on
    ``device`` (default: the weights'); ``x`` may stay on the CPU, minibatches move. Minibatches
    of ``tokens_per_step`` are shuffled in runs of ``sequence`` consecutive tokens, which keeps
    each step's copy contiguous. Returns the transform and a small report (first/last epoch loss;
    with ``gate_select``, the final loss with and without the gates and whether they were kept)."""
    d = x.shape[-1]
    device = torch.device(device) if device is not None else weights[0].device
    if init not in ("hadamard", "random"):
        raise ValueError(f"fit_sgat: init must be 'hadamard' or 'random', got {init!r}")
    d1, d2 = kronecker_factors(d) if kron else (d, 1)
    start = random_hadamard if init == "hadamard" else random_orthogonal
    p1 = _Orthogonal(start(d1, generator).float().to(device))
    p2 = _Orthogonal(torch.eye(d2, device=device) if d2 == 1 else start(d2, generator).float().to(device))
    params = [p for m in (p1, p2) for p in m.parameters()] if d2 > 1 else list(p1.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    w = torch.cat([wj.detach().float() for wj in weights], dim=0).to(device)
    x = x.detach().reshape(-1, d)
    state = is_masked.reshape(-1).to(x.device)
    if gates:
        with torch.no_grad():
            energy_m, energy_u = _state_energy(x, state, p1.weight.detach(), p2.weight.detach(), device)
        if energy_m is None or energy_u is None:
            gate_m, gate_u = private_gates(d, private_fraction)
        else:
            gate_m, gate_u = gates_from_energy(energy_m, energy_u, private_fraction)
    else:
        gate_m, gate_u = torch.ones(d), torch.ones(d)
    gate_m, gate_u = gate_m.to(device), gate_u.to(device)
    unit = sequence if sequence > 0 and x.shape[0] % sequence == 0 else 1
    xs, ss = x.reshape(-1, unit, d), state.reshape(-1, unit)
    per_step = max(1, tokens_per_step // unit)
    steps = max(1, math.ceil(xs.shape[0] / per_step))
    # Host-held activations reach the GPU through one pinned staging buffer (pageable copies are
    # several times slower, and they are most of a step's time at 8B sizes).
    staging = None
    if device.type == "cuda" and xs.device.type == "cpu":
        staging = torch.empty((per_step, unit, d), dtype=xs.dtype).pin_memory()
    history = []
    for _ in range(epochs):
        order = torch.randperm(xs.shape[0], generator=generator)
        total = 0.0
        for i in range(steps):
            idx = order[i * per_step : (i + 1) * per_step]
            if staging is not None:
                chunk = torch.index_select(xs, 0, idx, out=staging[: len(idx)])
            else:
                chunk = xs[idx]
            xb = chunk.reshape(-1, d).to(device).float()
            sb = ss[idx].reshape(-1).to(device)
            a, b = p1.weight, p2.weight  # x P and W P as P1ᵀ X P2 (never forming the d × d product)
            target = xb @ w.t()
            xt = kron_apply(xb, a, b) * torch.where(sb[:, None], gate_m, gate_u)
            out = fake_quant_activation(xt, a_bits) @ fake_quant_weight(kron_apply(w, a, b), w_bits).t()
            loss = (target - out).pow(2).sum() / target.pow(2).sum().clamp(min=1e-12)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        history.append(total / steps)
    report = {"loss_first_epoch": history[0] if history else None, "loss_last_epoch": history[-1] if history else None}
    if gates and gate_select:
        with torch.no_grad():
            a, b = p1.weight.detach(), p2.weight.detach()
            w_f = fake_quant_weight(kron_apply(w, a, b), w_bits)
            gated = _site_loss(x, state, w, w_f, a, b, a_bits, gate_m, gate_u, device, tokens_per_step)
            ungated = _site_loss(x, state, w, w_f, a, b, a_bits, torch.ones_like(gate_m), torch.ones_like(gate_u), device, tokens_per_step)
        gates = gated < ungated
        report.update(loss_gated=gated, loss_ungated=ungated, gates_kept=gates)
        if not gates and gate_retrain:  # P was trained for the gates: train one for none, keep the better
            options = dict(kron=kron, epochs=epochs, lr=lr, tokens_per_step=tokens_per_step, sequence=sequence,
                           private_fraction=private_fraction, init=init, generator=generator, fold_norm=fold_norm, device=device)
            retrained, again = fit_sgat(x, is_masked, weights, w_bits, a_bits, gates=False, **options)
            with torch.no_grad():
                p1r, p2r = (t.float().to(device) for t in (retrained.p1, retrained.p2))
                w_fr = fake_quant_weight(kron_apply(w, p1r, p2r), w_bits)
                ones = torch.ones_like(gate_m)
                loss = _site_loss(x, state, w, w_fr, p1r, p2r, a_bits, ones, ones, device, tokens_per_step)
            report["loss_retrained"] = loss
            if loss < ungated:
                return retrained, {**report, "retrained": True, "loss_last_epoch": again["loss_last_epoch"]}
    with torch.no_grad():
        transform = SiteTransform(
            fold_norm=fold_norm,
            p1=p1.weight.detach().double().cpu(),
            p2=p2.weight.detach().double().cpu(),
            gate_masked=gate_m.cpu() if gates else None,
            gate_unmasked=gate_u.cpu() if gates else None,
        )
    return transform, report


def _site_loss(x, state, w, w_f, p1, p2, a_bits, gate_m, gate_u, device, chunk: int) -> float:
    """The training loss of a fitted transform (weights ``w_f`` already transformed and quantized)
    over all tokens ``x`` [T, d], in chunks of a training step's size (its memory): ``x`` may be on the host."""
    err = ref = 0.0
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk].to(device).float()
        sb = state[i : i + chunk].to(device)
        target = xb @ w.t()
        xt = kron_apply(xb, p1, p2) * torch.where(sb[:, None], gate_m, gate_u)
        err += (target - fake_quant_activation(xt, a_bits) @ w_f.t()).pow(2).sum(dtype=torch.float64).item()
        ref += target.pow(2).sum(dtype=torch.float64).item()
    return err / max(ref, 1e-12)
