"""On a small model with injected activation outliers, W4A4 logits' SQNR ranks the methods:
starquant level with quarot (within the run-to-run spread) and both far above rtn; the ablations
(no TAC, no SGAT gates) stay above rtn.

This compares methods on one fixed model and data set (seeded), as a benchmark would. Measured
(dB, torch 2.13, one thread, sgat_select on): rtn 6.24, quarot 11.23, starquant 12.10, without
TAC 12.45, without SGAT gates 12.47. Over 3 model x 3 calibration seeds
(benchmarks/explore/ranking.py) starquant beats quarot on 9 of 9 (+1.3 dB) and TAC helps on 7
of 9 (+0.7), but gates lose to no gates on 8 of 9 (by 0.6 dB) even though sgat_select drops them
on all but a few sites (without it they cost 0.9 dB, 9 of 9): the injected outliers (norm scales)
hit masked and unmasked tokens alike, and the gates cost each state 1/32 of its columns
(benchmarks/sgat_gates.py). One seed's numbers swing by about ±0.7 dB with the calibration seed
and the thread count, so the test asserts only what holds beyond that spread."""

import torch

from stq_compiler.backend import StarQuant
from stq_compiler.calibration.calibrate import calibrate
from tests.conftest import logits_of, sqnr_db, tiny_model


def outlier_model(d=128, seed=0, mask_outliers=False):
    """A few channels of every norm scale 10-50x: activation outliers. With ``mask_outliers``
    (benchmarks/explore/ranking.py) also 3 channels of the mask token's embedding row, among those
    the norm outliers leave alone: outliers that depend on the token state."""
    torch.manual_seed(seed)
    model = tiny_model("llada", seed=seed, n_layers=2, d_model=d, n_heads=d // 16, n_kv_heads=d // 16, mlp_hidden_size=2 * d)
    scales = torch.tensor([10.0, 30.0, 50.0])
    with torch.no_grad():
        hit = torch.zeros(d, dtype=torch.bool)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                idx = torch.randperm(p.numel())[:3]
                p[idx] *= scales
                hit[idx] = True
        if mask_outliers:
            free = torch.nonzero(~hit).squeeze(1)
            channels = free[torch.randperm(free.numel(), generator=torch.Generator().manual_seed(seed + 100))[:3]]
            emb = next(p for name, p in model.named_parameters() if name.endswith("wte.weight"))
            emb[model.config.mask_token_id, channels] *= scales
    return model


def test_w4a4_ranking_on_an_outlier_model():
    model = outlier_model()
    calib = torch.randint(0, 255, (64, 64))
    test = torch.randint(0, 255, (16, 64))
    test[torch.rand(16, 64) < 0.5] = model.config.mask_token_id
    with torch.no_grad():
        reference = logits_of(model(test))
    # lr 1e-2: the paper's 1e-3 is for 8B-sized transforms trained on 128 x 2048 tokens; this
    # model trains each site on ~5k tokens for 15 epochs.
    runs = {
        "rtn": ("rtn", {}),
        "quarot": ("quarot", {}),
        "starquant": ("starquant", {"lr": 1e-2}),
        "starquant-no-tac": ("starquant", {"lr": 1e-2, "tac": False}),
        "starquant-no-sgat": ("starquant", {"lr": 1e-2, "sgat": False}),
    }
    sqnr = {}
    for name, (method, options) in runs.items():
        recipe = calibrate(model, calib, method, 4, 4, progress=False, **options)
        torch._dynamo.reset()
        with torch.no_grad():
            out = logits_of(torch.compile(model, backend=StarQuant(recipe=recipe, inductor=False))(test))
        sqnr[name] = sqnr_db(reference, out)
    print("W4A4 logits SQNR (dB):", {k: round(v, 2) for k, v in sqnr.items()})
    spread = 0.7  # dB, run to run (calibration seed, torch version)
    assert sqnr["starquant"] >= sqnr["quarot"] - spread
    assert sqnr["quarot"] > sqnr["rtn"] + 3 and sqnr["starquant"] > sqnr["rtn"] + 3
    for ablation in ("starquant-no-tac", "starquant-no-sgat"):
        assert sqnr[ablation] > sqnr["rtn"] + 3
