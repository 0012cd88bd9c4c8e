"""The code Inductor generates for a fused W4A4 model (CPU): per transformer block exactly four
activation-side kernels (one ``stq.fused_quantize`` per site) and four GEMMs (q/k/v stacked,
o with its residual, gate/up stacked, down with its residual), none of the unfused quantized ops,
and no generated kernel that reads 4- or 8-bit codes, i.e. no weight dequantized to float on
the way. A fusion that silently stops fusing fails here."""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from stq_compiler.backend import StarQuant
from tests.conftest import tiny_model

LAYERS = 2


def _calls(code: str, op: str) -> int:
    return len(re.findall(rf"= torch\.ops\.stq\.{op}\.default\(", code))


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_fused_block_launches_one_quantizer_per_site_and_one_gemm_per_stack(arch):
    model = tiny_model(arch, n_layers=LAYERS)
    mask_id = model.config.mask_token_id
    ids = torch.randint(0, mask_id, (1, 16))
    ids[0, ::3] = mask_id
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=StarQuant(w_bits=4, a_bits=4, mask_token_id=mask_id, fuse=True))
    with torch.no_grad():
        _, codes = run_and_get_code(compiled, ids)
    code = "\n".join(codes)
    assert _calls(code, "fused_quantize") == 4 * LAYERS
    assert _calls(code, "fused_linear") == 4 * LAYERS
    for unfused in ("quantize_per_token", "quantized_linear", "kron_transform", "tac_block_affine"):
        assert f"torch.ops.stq.{unfused}" not in code
    # Inductor's own kernels (C++ here) never take a pointer to codes: every int8 / uint8 buffer
    # goes to the stq ops only
    signatures = re.findall(r"async_compile\.cpp_pybinding\(\[([^\]]*)\]", code)
    assert signatures, "no generated kernels found: the code format changed"
    assert not [s for s in signatures if "int8_t" in s], signatures
