"""quantize_linears against an independent fake-quantized model computed in float64."""

import torch
import torch.nn as nn

from stq_compiler.analysis import analyze
from stq_compiler.ops import quantize_weight
from stq_compiler.passes.quantize_linears import quantize_linears
from tests.conftest import capture_graphs, logits_of, sqnr_db, tiny_model


def fake_quant_linear(x, weight, bias, w_bits, a_bits):
    """Quantize-dequantize in float64, written from the spec (module docstring of ops.py)."""
    qmax_w = 2 ** (w_bits - 1) - 1
    w = weight.double()
    w_scale = (weight.float().abs().amax(1) / qmax_w).double()[:, None]
    w_dq = torch.clamp(torch.floor(w / w_scale + 0.5), -qmax_w, qmax_w) * w_scale
    qmin, qmax = -(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1
    xd = x.double()
    lo = xd.min(-1, keepdim=True).values.clamp(max=0)
    hi = xd.max(-1, keepdim=True).values.clamp(min=0)
    scale = ((hi - lo).float() / (2**a_bits - 1)).double()
    zero = qmin - torch.floor(lo / scale + 0.5)
    x_dq = (torch.clamp(torch.floor(xd / scale + 0.5) + zero, qmin, qmax) - zero) * scale
    y = x_dq @ w_dq.t()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


class FakeQuantLinear(nn.Module):
    def __init__(self, linear, w_bits, a_bits):
        super().__init__()
        self.linear, self.w_bits, self.a_bits = linear, w_bits, a_bits

    def forward(self, x):
        return fake_quant_linear(x, self.linear.weight, self.linear.bias, self.w_bits, self.a_bits)


def fake_quantize_model(model, w_bits, a_bits, skip=("ff_out",)):
    """Swap every nn.Linear but the LM head (top-level name in ``skip``) for a fake-quant one."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not (full.endswith(skip) and ".blocks." not in full):
                setattr(module, child_name, FakeQuantLinear(child, w_bits, a_bits))
    return model


def test_rewritten_graph_matches_fake_quantized_model():
    for w_bits, a_bits in ((8, 8), (4, 4), (4, 8)):
        model = tiny_model("llada")
        ids = torch.randint(0, model.config.vocab_size, (2, 12))
        (gm, inputs), = capture_graphs(model, ids)
        analysis = analyze(gm, inputs)
        gm, report = quantize_linears(gm, analysis, w_bits, a_bits)
        with torch.no_grad():
            out = gm(*inputs)
            reference = logits_of(fake_quantize_model(model, w_bits, a_bits)(ids))
        logits = next(o for o in out if o.shape == reference.shape)
        # Same arithmetic up to float32 rounding. Where an activation lands within rounding of a
        # half step its code can flip (about one flip in 1e5 activations here), moving that one
        # value by a quantization step: ~60 dB per flip at W8A8 (30 seeds: worst 59.9 dB). A
        # wiring mistake (wrong weight, site or scale) costs tens of dB, and the unquantized
        # model sits at ~40 dB (W8A8) / ~17 dB (W4A4) from this reference.
        assert sqnr_db(reference, logits) > 45, (w_bits, a_bits)
        assert report.details["linears_quantized"] == 14 and report.details["sites"] == 8


def test_weights_are_quantized_once_into_buffers():
    model = tiny_model("llada")
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    (gm, inputs), = capture_graphs(model, ids)
    analysis = analyze(gm, inputs)
    gm, report = quantize_linears(gm, analysis, 4, 4, quantize_head=True)
    params = dict(model.named_parameters())
    linear_nodes = [n for n in gm.graph.nodes if n.target is torch.ops.stq.quantized_linear.default]
    assert len(linear_nodes) == 15 == report.details["linears_quantized"]
    for node in linear_nodes:
        fqn = node.meta["stq_linear"]["fqn"]
        expected = quantize_weight(params[fqn], 4)
        wq, ws, wsum = (getattr(gm, arg.target) for arg in node.args[3:6])
        assert torch.equal(wq, expected.q) and torch.equal(ws, expected.scale) and torch.equal(wsum, expected.w_sum)
    assert len([name for name, _ in gm.named_buffers() if name.endswith("_q")]) == 15
    # nothing reads the float weights of quantized linears any more
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    for binding in analysis.bindings.values():
        if binding.fqn in {n.meta["stq_linear"]["fqn"] for n in linear_nodes}:
            assert not placeholders[binding.node.name].users
