"""Streamed calibration on a CUDA GPU with the model's weights on the CPU: each block's weights
move to the GPU only while it is calibrated, and the recipe matches calibrating the same model
held on the GPU. Run on a GPU machine: ``pytest -m cuda tests/calibration/test_stream_cuda.py``."""

import pytest
import torch

from stq_compiler.calibration.calibrate import calibrate
from tests.conftest import tiny_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = {"epochs": 2, "trajectory_prompts": 1, "trajectory_steps": 4, "progress": False}


@pytest.mark.parametrize("arch,method,options", [
    ("llada", "starquant", {}),
    ("dream", "starquant", {}),
    ("llama", "quarot", {"gptq": True}),
])
def test_weights_on_the_host_give_the_recipe_of_weights_on_the_gpu(arch, method, options):
    model = tiny_model(arch, seed=3).to(torch.bfloat16)
    ids = torch.randint(0, 255, (8, 32), generator=torch.Generator().manual_seed(1))
    on_host = calibrate(model, ids, method, 4, 4, device="cuda", **SMALL, **options)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(t.device.type == "cpu" for t in on_host.tensors.values())
    on_gpu = calibrate(model.to("cuda"), ids, method, 4, 4, **SMALL, **options)
    assert on_host.tensors.keys() == on_gpu.tensors.keys()
    for key, tensor in on_gpu.tensors.items():
        torch.testing.assert_close(on_host.tensors[key].float(), tensor.float(), rtol=1e-3, atol=1e-3, msg=key)
    blocks = on_host.options["timing"]["blocks"]
    assert all(b["peak_gpu_gb"] > 0 for b in blocks)


def test_gpu_memory_holds_one_block_of_weights():
    """Eight blocks: with the weights on the CPU the GPU's peak is the whole model's weights lower
    than with them on the GPU (less one block's, which it holds while calibrating that block)."""
    model = tiny_model("llada", seed=3, n_layers=8, d_model=512, n_heads=8, n_kv_heads=8, mlp_hidden_size=2048)
    ids = torch.randint(0, 255, (8, 64), generator=torch.Generator().manual_seed(1))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    options = {**SMALL, "tac": False, "resident_gb": 0.0}

    def peak(model, **extra):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        calibrate(model, ids, "starquant", 4, 4, **options, **extra)
        return torch.cuda.max_memory_allocated()

    on_gpu = peak(model.to("cuda"))  # first: it also allocates the libraries' workspaces
    model.to("cpu")
    torch.cuda.empty_cache()
    on_host = peak(model, device="cuda")
    assert on_host < on_gpu - weights / 2, (on_host, on_gpu, weights)
