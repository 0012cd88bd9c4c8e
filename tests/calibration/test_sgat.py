"""SGAT's gate placement: chunked energies (activations larger than the device) pick the same gates."""

import torch

from stq_compiler.calibration.sgat import _state_energy, gates_by_energy, gates_from_energy, private_count
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
