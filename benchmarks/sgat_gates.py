"""What SGAT's state gates cost on the bundled model: the site loss with and without gates.

    python benchmarks/sgat_gates.py [--sequences 16] [--epochs 6]

For sites of a few blocks of ``stq-tiny-llada`` it collects the site inputs on calibration text
corrupted at random mask ratios, and fits SGAT (``fit_sgat``, W4A4, Kronecker-factored P from the
randomized Hadamard start) with the gates and without them, reporting the normalised layer loss
``Σ_s ‖X_s Wᵀ − Q_a(X_s P G_s) Q_w(Pᵀ Wᵀ)‖² / ‖X Wᵀ‖²`` at the start (lr 0) and after training.
The difference at the start is the gates' leakage (the energy each state has in the other state's
private columns); the difference after training is what training did not remove. Site inputs are
taken as they reach the linears (the norm scale not folded), which is enough to compare the two.

A third column tries a data-driven start for the private columns (not what the package does):
a dense P whose unmasked-private columns are the lowest-energy eigenvectors of the masked tokens'
second moment, whose masked-private ones are the lowest-energy eigenvectors of the unmasked
tokens' (orthogonal to the first), and whose shared columns are a random rotation of the rest. Its
loss with and without the gates shows whether the leakage can be designed away, and what the
eigenvector columns cost the quantizer. Results: ``results/sgat-gates-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stq_compiler.calibration.sgat import fake_quant_activation, fake_quant_weight, fit_sgat, private_count
from stq_compiler.calibration.transforms import random_orthogonal
from stq_compiler.corpus import texts
from stq_compiler.evaluation import token_stream, windows
from stq_compiler.models import DEFAULT_MODEL, load, load_tokenizer

SITES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("attn_out",), "gate_up": ("ff_proj", "up_proj"), "down": ("ff_out",)}


def eigen_private_basis(x: torch.Tensor, state: torch.Tensor, generator: torch.Generator):
    """Dense P (columns: shared, masked-private, unmasked-private) and the gates, from the data."""
    d = x.shape[1]
    p = private_count(d)
    second_moment = {s: (x[rows].double().T @ x[rows].double()) / int(rows.sum()) for s, rows in (("m", state), ("u", ~state))}
    unmasked_private = torch.linalg.eigh(second_moment["m"]).eigenvectors[:, :p]  # off for masked tokens
    away = torch.eye(d, dtype=torch.float64) - unmasked_private @ unmasked_private.T
    # the lowest-energy unmasked directions orthogonal to those (the penalty keeps them out)
    penalised = away @ second_moment["u"] @ away + 1e6 * unmasked_private @ unmasked_private.T
    masked_private = torch.linalg.eigh(penalised).eigenvectors[:, :p]
    fill = torch.randn(d, d - 2 * p, dtype=torch.float64, generator=generator)
    q, _ = torch.linalg.qr(torch.cat([unmasked_private, masked_private, fill], 1))
    shared = q[:, 2 * p :] @ random_orthogonal(d - 2 * p, generator)
    basis = torch.cat([shared, masked_private, unmasked_private], 1).float()
    gate_masked, gate_unmasked = torch.ones(d), torch.ones(d)
    gate_masked[d - p :] = 0
    gate_unmasked[d - 2 * p : d - p] = 0
    return basis, gate_masked, gate_unmasked


def site_loss(x, state, w, basis, gate_masked, gate_unmasked) -> float:
    """The SGAT loss of a fixed basis (fit_sgat's formula, no training)."""
    target = x @ w.t()
    xt = (x @ basis) * torch.where(state[:, None], gate_masked, gate_unmasked)
    out = fake_quant_activation(xt, 4) @ fake_quant_weight(w @ basis, 4).t()
    return float((target - out).pow(2).sum() / target.pow(2).sum())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="0,3,5")
    p.add_argument("--sequences", type=int, default=16, help="calibration windows of 128 tokens (half per corpus)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sgat-gates-cpu.json")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = load(DEFAULT_MODEL, dtype=torch.float32)
    tokenizer = load_tokenizer()
    ids = torch.cat([windows(token_stream(tokenizer, texts(c, "calibration")), 128, args.sequences // 2) for c in ("kjv", "wiki")])
    gen = torch.Generator().manual_seed(0)
    masked = torch.rand(ids.shape, generator=gen) < torch.rand(ids.shape[0], 1, generator=gen)
    blocks = model.model.transformer["blocks"]
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for b in (int(i) for i in args.blocks.split(",")):
        for site, linears in SITES.items():
            module = getattr(blocks[b], linears[0])
            hooks.append(module.register_forward_hook(
                lambda mod, inp, out, key=(b, site): inputs.__setitem__(key, inp[0].detach().reshape(-1, inp[0].shape[-1]))
            ))
    with torch.no_grad():
        model(torch.where(masked, model.config.mask_token_id, ids))
    for h in hooks:
        h.remove()

    state = masked.reshape(-1)
    rows = []
    for (b, site), x in tqdm(inputs.items(), desc="sites"):
        weights = [getattr(blocks[b], name).weight.detach().float() for name in SITES[site]]
        row = {"block": b, "site": site}
        for gates in (True, False):
            key = "gates" if gates else "no_gates"
            _, start = fit_sgat(x, state, weights, 4, 4, gates=gates, epochs=1, lr=0.0, generator=torch.Generator().manual_seed(1))
            clock = time.perf_counter()
            _, fitted = fit_sgat(x, state, weights, 4, 4, gates=gates, epochs=args.epochs, lr=args.lr, generator=torch.Generator().manual_seed(1))
            row[f"{key}_start"] = start["loss_first_epoch"]
            row[f"{key}_trained"] = fitted["loss_last_epoch"]
            row[f"{key}_fit_s"] = round(time.perf_counter() - clock, 2)
        basis, gate_m, gate_u = eigen_private_basis(x, state, torch.Generator().manual_seed(1))
        w = torch.cat(weights)
        row["eigen_private_gates_start"] = site_loss(x, state, w, basis, gate_m, gate_u)
        row["eigen_private_no_gates_start"] = site_loss(x, state, w, basis, torch.ones_like(gate_m), torch.ones_like(gate_u))
        rows.append(row)
        print(f"block {b} {site:8s} gates: {row['gates_start']:.5f} -> {row['gates_trained']:.5f}   "
              f"no gates: {row['no_gates_start']:.5f} -> {row['no_gates_trained']:.5f}   "
              f"eigen-private start, gates: {row['eigen_private_gates_start']:.5f}, no gates: {row['eigen_private_no_gates_start']:.5f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}  # no machine paths
    args.out.write_text(json.dumps({"model": DEFAULT_MODEL, "torch": torch.__version__, "settings": settings,
                                    "tokens": int(state.numel()), "masked_share": float(state.double().mean()),
                                    "sites": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
