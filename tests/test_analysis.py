"""Analysis from graph patterns: linears, roles, sites, attention cores, TAC points."""

import pytest
import torch
import torch.nn as nn

from stq_compiler.analysis import analyze
from tests.conftest import ARCHS, capture_graphs, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_roles_sites_and_attention_of_each_architecture(arch):
    model = tiny_model(arch)
    layers = 2
    (gm, inputs), = capture_graphs(model, torch.randint(0, model.config.vocab_size, (2, 9)))
    a = analyze(gm, inputs)
    assert a.roles == {"qkv": 3 * layers, "o": layers, "gate_up": 2 * layers, "down": layers, "head": 1}
    # q/k/v share one site, gate/up another; o, down and the head are sites of their own.
    assert sorted(len(s.linears) for s in a.sites) == sorted([3] * layers + [2] * layers + [1] * (2 * layers + 1))
    for site in a.sites:
        assert len({lin.role for lin in site.linears}) == 1
    assert len(a.attention) == layers
    params = dict(model.named_parameters())
    for core in a.attention:
        proj = core.output_projection
        assert proj is not None and proj.role == "o"
        # the TAC point carries the merged heads: width C = the o projection's input features
        assert core.tac_point is proj.input
        assert proj.in_features == params[proj.fqn].shape[1]
    assert a.state_source is not None


def test_linears_in_other_forms_are_recognised():
    class MatmulForms(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(16, 8))   # [out, in], used as x @ w1.t()
            self.w2 = nn.Parameter(torch.randn(16, 16))  # [out, in], used as x @ w2.T
            self.w3 = nn.Parameter(torch.randn(16, 4))   # [in, out], used as x @ w3

        def forward(self, x):
            h = torch.matmul(x, self.w1.t())
            h = h @ self.w2.T
            return h @ self.w3

    (gm, inputs), = capture_graphs(MatmulForms(), torch.randn(3, 8))
    a = analyze(gm, inputs)
    layouts = {lin.fqn: (lin.weight_layout, lin.in_features, lin.out_features) for lin in a.linears}
    assert layouts == {"w1": ("nk", 8, 16), "w2": ("nk", 16, 16), "w3": ("kn", 16, 4)}
