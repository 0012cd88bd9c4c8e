"""SGAT: chunked energies (activations larger than the device) pick the same gates; gate selection."""

import torch

from stq_compiler.calibration.sgat import _state_energy, fit_sgat, gates_by_energy, gates_from_energy, private_count
from stq_compiler.calibration.transforms import kron_apply, random_hadamard


def test_chunked_state_energy_places_the_gates_as_all_tokens_at_once():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=gen) * torch.linspace(0.1, 3, 64)
    state = torch.rand(300, generator=gen) < 0.4
    p1, p2 = random_hadamard(8, gen).float(), random_hadamard(8, gen).float()
    energy_m, energy_u = _state_energy(x, state, p1, p2, "cpu", chunk=7)
    xp = kron_apply(x, p1, p2)
    torch.testing.assert_close(energy_m.float(), xp[state].pow(2).mean(0), rtol=1e-5, atol=0)
    gm, gu = gates_from_energy(energy_m, energy_u)
    ref_m, ref_u = gates_by_energy(xp, state)
    assert torch.equal(gm, ref_m) and torch.equal(gu, ref_u)
    assert (gm == 0).sum() == (gu == 0).sum() == private_count(64)


def test_state_energy_of_an_absent_state_is_none():
    x, state = torch.randn(10, 4), torch.ones(10, dtype=torch.bool)
    energy_m, energy_u = _state_energy(x, state, torch.eye(2), torch.eye(2), "cpu")
    assert energy_m is not None and energy_u is None


def test_gate_select_drops_gates_that_only_leak():
    """Both states drawn alike: the private columns carry each state's energy, which its gate
    zeroes (leakage), and separate nothing; the trained P does better without its gates. With
    ``gate_retrain`` a P trained for no gates replaces it where it does better still."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 64, generator=gen) * torch.linspace(0.1, 3, 64)
    state = torch.rand(1024, generator=gen) < 0.5
    w = torch.randn(48, 64, generator=gen)
    fit = dict(epochs=2, lr=1e-2, tokens_per_step=256, gate_select=True)
    transform, report = fit_sgat(x, state, [w], 4, 4, generator=torch.Generator().manual_seed(1), **fit)
    assert report["loss_ungated"] < report["loss_gated"] and not report["gates_kept"]
    assert not transform.has_gates
    retrained, again = fit_sgat(x, state, [w], 4, 4, generator=torch.Generator().manual_seed(1), gate_retrain=True, **fit)
    assert again["loss_gated"] == report["loss_gated"] and not retrained.has_gates
    assert again.get("retrained", False) == (again["loss_retrained"] < again["loss_ungated"])
