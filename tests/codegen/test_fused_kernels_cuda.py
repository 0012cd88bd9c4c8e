"""The fused Triton kernels against the reference ops on CUDA, at LLaDA-8B and Dream-7B shapes.

Run on a GPU machine: ``python3 -m pytest -q -s -m cuda tests/codegen/test_fused_kernels_cuda.py``;
every case prints one ``[stq-cuda] ...`` line for the results record.

* ``fused_quantize``: per site kind (q/k/v and gate/up inputs: RMSNorm + Kronecker + gate; the
  o_proj input: TAC + Kronecker + gate; the down_proj input: Kronecker + gate), M = 1, 7, 1024,
  4096, 4 and 8 bits, against the reference computed on CPU copies (the definition). The float
  stages sum in another order and the Kronecker dots are bf16x3, so codes may move next to a
  rounding tie, within the float error bound of ``tests/codegen/code_agreement.py``.
  The same at the small models' widths (the bundled model's and the tests' tiny ones), whose
  Kronecker dots are 8-32 wide.
* ``fused_linear``: the integer part exact (unit scales, float32 output, reference = float64
  matmul of the codes on the GPU, exact below 2**53) for every linear shape and operand mode
  (W4A4 packed, W8A8, W4A8), and every autotuning configuration at one awkward shape; the
  epilogues (bias, SwiGLU, residual) within a tolerance tied to float32 epilogue arithmetic.
* the Gluon W4 kernel (``codegen/gluon_w4.py``, what ``fused_linear`` runs on Hopper for a packed
  weight and int8 activation codes): its integer part exact with either tile, at the real plain and
  residual linears and awkward shapes; its bf16 epilogue bit-identical to the Triton W4 kernel's;
  ``fused_linear`` taking it exactly where TMA can read the operands.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from stq_compiler import fused_ops, ops
from stq_compiler.calibration.transforms import kronecker_factors
from stq_compiler.codegen import triton_fused
from tests.codegen.code_agreement import code_agreement, reference_values

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") == "1", reason="TRITON_INTERPRET=1: kernels would be interpreted"
    ),
]

DEV = "cuda"
MODELS = {"llada": (4096, 12288), "dream": (3584, 18944)}  # (hidden, MLP)
# small models' widths: the bundled stq-tiny-llada (Kronecker factors 16 x 16 and 24 x 32) and the
# tests' tiny models (8 x 8, 8 x 16)
SMALL_MODELS = {"stq-tiny-llada": (256, 768), "tiny": (64, 128)}
TOKENS = (1, 7, 1024, 4096)


def report(op, case, ok, **numbers):
    fields = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    print(f"[stq-cuda] {op:<14} {case:<48} {fields} {'PASS' if ok else 'FAIL'}")


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _activation(m, k, seed, dtype=torch.bfloat16):
    gen = _gen(seed)
    x = torch.randn(m, k, device=DEV, generator=gen)
    x[:, torch.randint(0, k, (8,), device=DEV, generator=gen)] *= 30.0  # outlier channels
    return x.to(dtype)


def _orthogonal(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].float().to(DEV)


# ----------------------------------------------------------------------------------------------
# fused_quantize

SITES = ("qkv", "o", "gate_up", "down")
QUANT_CASES = [
    (model, site, m, bits)
    for model in MODELS
    for site in SITES
    for m in TOKENS
    for bits in (4, 8)
    if not (m == 4096 and bits == 8)
]


def _site_args(model, site, m, seed):
    hidden, mlp = MODELS[model] if model in MODELS else SMALL_MODELS[model]
    k = mlp if site == "down" else hidden
    gen = _gen(seed + 1)
    kw = {}
    if site in ("qkv", "gate_up"):
        kw["rms_eps"] = 1e-5
        if site == "gate_up":  # a norm weight left in the op (not folded into W)
            kw["norm_weight"] = (torch.rand(k, device=DEV, generator=gen) + 0.5).bfloat16()
    if site == "o":
        g = 16
        eye = torch.eye(g, device=DEV).expand(k // g, g, g)
        kw["tac_m"] = 0.55 * eye + 0.45 * torch.randn(k // g, g, g, device=DEV, generator=gen) / 4
        kw["tac_d"] = torch.randn(k, device=DEV, generator=gen) * 0.05
    d1, d2 = kronecker_factors(k)
    kw["p1"], kw["p2"] = _orthogonal(d1, seed + 2), _orthogonal(d2, seed + 3)
    kw["is_masked"] = torch.rand(m, device=DEV, generator=gen) < 0.5
    # SGAT's column gates: d/32 private columns per state, the masked ones first
    private = max(1, k // 32)
    kw["gate_masked"] = torch.ones(k, device=DEV)
    kw["gate_masked"][k - private:] = 0.0  # masked tokens drop the unmasked-private columns
    kw["gate_unmasked"] = torch.ones(k, device=DEV)
    kw["gate_unmasked"][k - 2 * private: k - private] = 0.0  # and unmasked tokens the masked-private
    return k, kw


@pytest.mark.parametrize("model,site,m,bits", QUANT_CASES, ids=[f"{a}-{b}-M{c}-a{d}" for a, b, c, d in QUANT_CASES])
def test_fused_quantize_real_shapes(model, site, m, bits):
    seed = zlib.crc32(repr((model, site, m, bits)).encode()) % 100003
    k, kw = _site_args(model, site, m, seed)
    x = _activation(m, k, seed)
    q, scale, zero = triton_fused.fused_quantize_triton(x, bits, **kw)
    torch.cuda.synchronize()
    cpu = {n: t.cpu() for n, t in kw.items() if isinstance(t, torch.Tensor)}
    cpu.update({n: v for n, v in kw.items() if not isinstance(v, torch.Tensor)})
    want = fused_ops.fused_quantize_reference(x.cpu(), bits, **cpu)
    ok, numbers = code_agreement((q, scale, zero), want, reference_values(x.cpu(), **cpu), k, bits)
    tile = triton_fused._kron_tile(*kronecker_factors(k))
    path = ("fused" if tile <= triton_fused.MAX_FUSED_KRON_TILE else
            "token-split" if triton_fused.token_split(*kronecker_factors(k)) else
            "token-kron" if tile <= triton_fused.MAX_TOKEN_KRON_TILE else
            "chunk-kron" if triton_fused._kron_chunked(*kronecker_factors(k)) else "torch-kron")
    # the factors split ahead (as the fusion pass does): the same bits as split in the kernel
    triton_fused.PRESPLIT_LAUNCHES.clear()
    triton_fused.prepare_factor_splits(kw["p1"], kw["p2"])
    presplit = triton_fused.fused_quantize_triton(x, bits, **kw)
    same = all(torch.equal(a, b) for a, b in zip((q, scale, zero), presplit))
    report("fused_quantize", f"{model} {site} M={m} K={k} a{bits} {path}", ok, presplit_same=same,
           launches=dict(triton_fused.PRESPLIT_LAUNCHES), **numbers)
    assert ok and same and triton_fused.PRESPLIT_LAUNCHES == {"presplit": 1}


SMALL_CASES = [(model, site, m) for model in SMALL_MODELS for site in SITES for m in (1, 7, 64)]


@pytest.mark.parametrize("model,site,m", SMALL_CASES, ids=[f"{a}-{b}-M{c}" for a, b, c in SMALL_CASES])
def test_fused_quantize_small_models(model, site, m):
    # Small models' Kronecker factors make dots 16 or 32 wide, several in one kernel: where
    # Triton's Hopper bug (triton-lang/triton#10486, #11366: wrong values or faults) struck
    # _token_kron_split_kernel. The GPU accuracy runs of the bundled model go through these.
    seed = zlib.crc32(repr(("small", model, site, m)).encode()) % 100003
    k, kw = _site_args(model, site, m, seed)
    x = _activation(m, k, seed)
    got = triton_fused.fused_quantize_triton(x, 4, **kw)
    torch.cuda.synchronize()
    cpu = {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    want = fused_ops.fused_quantize_reference(x.cpu(), 4, **cpu)
    ok, numbers = code_agreement(got, want, reference_values(x.cpu(), **cpu), k, 4)
    triton_fused.PRESPLIT_LAUNCHES.clear()
    triton_fused.prepare_factor_splits(kw["p1"], kw["p2"])
    same = all(torch.equal(a, b) for a, b in zip(got, triton_fused.fused_quantize_triton(x, 4, **kw)))
    report("fused_quantize", f"{model} {site} M={m} K={k} kron={kronecker_factors(k)}", ok, presplit_same=same,
           launches=dict(triton_fused.PRESPLIT_LAUNCHES), **numbers)
    assert ok and same and triton_fused.PRESPLIT_LAUNCHES == {"presplit": 1}


BYTES_CASES = [(model, site) for model in MODELS for site in SITES]


@pytest.mark.parametrize("model,site", BYTES_CASES, ids=[f"{a}-{b}" for a, b in BYTES_CASES])
def test_fused_quantize_bytes_real_shapes(model, site):
    # pack=False (the fusion pass's W4A4): int8 codes one a byte, against the reference, with the
    # criterion of test_fused_quantize_real_shapes. Not compared bit for bit with the packed
    # variant: it is compiled separately and its float stages may sum in another order.
    seed = zlib.crc32(repr(("bytes", model, site)).encode()) % 100003
    k, kw = _site_args(model, site, 1024, seed)
    x = _activation(1024, k, seed)
    q, scale, zero = triton_fused.fused_quantize_triton(x, 4, **kw, pack=False)
    torch.cuda.synchronize()
    cpu = {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    want = fused_ops.fused_quantize_reference(x.cpu(), 4, **cpu, pack=False)
    ok, numbers = code_agreement((q, scale, zero), want, reference_values(x.cpu(), **cpu), k, 4)
    ok = ok and q.dtype == torch.int8 and q.shape == (1024, k)
    report("fused_quantize", f"{model} {site} M=1024 K={k} a4 bytes", ok, **numbers)
    assert ok


def test_fused_quantize_exact_without_float_stages():
    # gate + quantize only: bit-exact against stq::quantize_per_token, packed
    k, kw = _site_args("llada", "down", 1024, 5)
    x = _activation(1024, k, 5)
    gates = (kw["is_masked"], kw["gate_masked"], kw["gate_unmasked"])
    q, scale, zero = triton_fused.fused_quantize_triton(x, 4, is_masked=gates[0], gate_masked=gates[1], gate_unmasked=gates[2])
    q_ref, scale_ref, zero_ref = ops.quantize_per_token_reference(x.cpu(), 4, *(g.cpu() for g in gates))
    ok = (torch.equal(fused_ops.unpack_int4(q.cpu(), k), q_ref) and torch.equal(scale.cpu(), scale_ref)
          and torch.equal(zero.cpu(), zero_ref))
    report("fused_quantize", f"gate-only M=1024 K={k} a4 exact", ok)
    assert ok


# ----------------------------------------------------------------------------------------------
# fused_linear

# (name, K, N (weight rows), epilogue, bias): every linear of both models as the fused graph runs them
LINEARS = [
    ("llada-qkv", 4096, 3 * 4096, "plain", False),
    ("llada-o", 4096, 4096, "residual", False),
    ("llada-gate_up", 4096, 2 * 12288, "swiglu", False),
    ("llada-down", 12288, 4096, "residual", False),
    ("dream-qkv", 3584, 3584 + 2 * 512, "plain", True),
    ("dream-o", 3584, 3584, "residual", False),
    ("dream-gate_up", 3584, 2 * 18944, "swiglu", False),
    ("dream-down", 18944, 3584, "residual", False),
]
# (activation bits, weight bits, activation packed[, weight blocked]): "w4a4-blocked" is what the
# fusion pass runs (4-bit activation codes one a byte, the weight in fused_ops.pack_int4_blocks'
# layout); it, "w4a4-bytes" and the W4A8 modes take the transposed W4 kernel
# (4-bit activation codes one a byte); it and "w4a8" take the transposed W4 kernel
OPERANDS = {"w4a4": (4, 4, True), "w8a8": (8, 8, False), "w4a8": (8, 4, False), "w4a4-bytes": (4, 4, False),
            "w4a4-blocked": (4, 4, False, True), "w4a8-blocked": (8, 4, False, True)}
W4_KERNEL_MODES = ("w4a8", "w4a4-bytes", "w4a4-blocked", "w4a8-blocked")


def _codes(m, n, k, a_bits, w_bits, a_packed, w_blocked=False, seed=0):
    gen = _gen(seed)
    a_lo, a_hi = -(1 << (a_bits - 1)), 1 << (a_bits - 1)
    w_max = (1 << (w_bits - 1)) - 1
    xq = torch.randint(a_lo, a_hi, (m, k), dtype=torch.int8, device=DEV, generator=gen)
    wq = torch.randint(-w_max, w_max + 1, (n, k), dtype=torch.int8, device=DEV, generator=gen)
    x_zero = torch.randint(a_lo, a_hi, (m, 1), dtype=torch.int32, device=DEV, generator=gen)
    w_sum = wq.sum(dim=1, dtype=torch.int32)
    x_store = fused_ops.pack_int4(xq) if a_packed else xq
    if w_blocked:
        w_store = fused_ops.pack_int4_blocks(wq)
    else:
        w_store = fused_ops.pack_int4(wq) if w_bits == 4 else wq
    return xq, wq, x_store, w_store, x_zero, w_sum


def _configs(mode):
    if mode.endswith("-blocked"):  # read one 128-code block a K step
        return [c for c in triton_fused.w4_gemm_configs() if c.kwargs["BLOCK_K"] == triton_fused.BLOCKED_STEP]
    return triton_fused.w4_gemm_configs() if mode in W4_KERNEL_MODES else triton_fused.gemm_configs()


def _fixed_config(m, mode):
    """One configuration per row-tile class: every configuration is checked at an awkward shape
    by test_fused_linear_every_config_is_exact, so the real shapes need not autotune (minutes)."""
    if mode in W4_KERNEL_MODES:
        want = (16, 128, 128, 4, 4) if m <= 16 else (128, 128, 128, 4, 4)
    else:
        want = (16, 128, 128, 4, 4) if m <= 16 else (128, 64, 128, 8, 4)
    for c in _configs(mode):
        kw = c.kwargs
        if (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_warps, c.num_stages) == want:
            return c
    raise LookupError(want)


def _exact_acc(xq, x_zero, wq, w_sum):
    # float64 products and sums of small integers are exact (|acc| < 2**53)
    return xq.double() @ wq.double().t() - x_zero.double() * w_sum.double()


INT_CASES = [
    (name, k, n, m, mode)
    for name, k, n, _, _ in LINEARS
    for mode in OPERANDS
    for m in (TOKENS if mode in ("w4a4", "w4a4-bytes", "w4a4-blocked") else (7, 1024))
]


@pytest.mark.parametrize("name,k,n,m,mode", INT_CASES, ids=[f"{a}-M{d}-{e}" for a, _, _, d, e in INT_CASES])
def test_fused_linear_integer_part_is_exact(name, k, n, m, mode):
    xq, wq, x_store, w_store, x_zero, w_sum = _codes(m, n, k, *OPERANDS[mode], seed=m + k + n)
    ones_m, ones_n = torch.ones(m, 1, device=DEV), torch.ones(n, device=DEV)
    y = triton_fused.fused_linear_triton(x_store, ones_m, x_zero, w_store, ones_n, w_sum, None, None, False, torch.float32,
                                         config=_fixed_config(m, mode))
    # int32 -> float32 rounds to nearest even on both sides, so equality holds above 2**24 too
    want = _exact_acc(xq, x_zero, wq, w_sum).to(torch.int32).float()
    ok = torch.equal(y, want)
    report("fused_linear", f"{name} M={m} K={k} N={n} {mode} int", ok, max_abs_diff=(y - want).abs().max().item())
    assert ok


@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("mode", list(OPERANDS))
def test_fused_linear_every_config_is_exact(mode, swiglu):
    # an awkward shape: M, N, K not multiples of any block; every autotuning configuration
    m, n, k = 300, 2 * 500 if swiglu else 1000, 1000 + 36
    xq, wq, x_store, w_store, x_zero, w_sum = _codes(m, n, k, *OPERANDS[mode], seed=11)
    ones_m, ones_n = torch.ones(m, 1, device=DEV), torch.ones(n, device=DEV)
    acc = _exact_acc(xq, x_zero, wq, w_sum).to(torch.int32).float()
    want = torch.nn.functional.silu(acc[:, : n // 2]) * acc[:, n // 2:] if swiglu else acc
    for config in _configs(mode):
        y = triton_fused.fused_linear_triton(x_store, ones_m, x_zero, w_store, ones_n, w_sum, None, None, swiglu,
                                             torch.float32, config=config)
        if swiglu:
            ok = bool(((y - want).abs() <= 1e-5 * (acc[:, : n // 2].abs() * acc[:, n // 2:].abs() + 1)).all())
        else:
            ok = torch.equal(y, want)
        kw = config.kwargs
        name = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} warps={config.num_warps} stages={config.num_stages}"
        report("fused_linear", f"config {name} {mode} {'swiglu' if swiglu else 'plain'}", ok)
        assert ok


def _reference_and_tolerance(args, w, k, epilogue):
    """The reference output of ``fused_linear(*args)`` (on the GPU: float64 integer matmul,
    float32 epilogue) and a per-element bound on a kernel's distance from it: float32 epilogue
    rounding (relative 1e-6, 1e-5 through SwiGLU) on the magnitudes involved, plus the bfloat16
    output's rounding."""
    xq, x_scale, x_zero, _, _, _, bias, residual = args[:8]
    y_ref = fused_ops.fused_linear_reference(*args)
    out_n = y_ref.shape[-1]
    lin = (_exact_acc(fused_ops.codes_of(xq, k), x_zero, w.q, w.w_sum) * x_scale.double() * w.scale.double()).abs()
    if bias is not None:
        lin = lin + bias.double().abs()
    if epilogue == "swiglu":
        magnitude, rel = lin[:, :out_n] * lin[:, out_n:] + lin[:, out_n:], 1e-5
    elif epilogue == "residual":
        magnitude, rel = lin + residual.double().abs(), 1e-6
    else:
        magnitude, rel = lin, 1e-6
    return y_ref, (rel + torch.finfo(torch.bfloat16).eps) * magnitude + torch.finfo(torch.bfloat16).tiny


EPI_CASES = [(name, k, n, epi, bias, m) for name, k, n, epi, bias in LINEARS for m in (7, 1024)]
# through the autotuner (the others run one fixed configuration): a few keys, each tunes in seconds
AUTOTUNED = {("llada-gate_up", 1024), ("llada-down", 1024), ("dream-qkv", 7)}


@pytest.mark.parametrize("mode", ["w4a4", "w8a8", "w4a4-bytes", "w4a4-blocked"])
@pytest.mark.parametrize("name,k,n,epilogue,has_bias,m", EPI_CASES, ids=[f"{c[0]}-M{c[5]}" for c in EPI_CASES])
def test_fused_linear_epilogue(name, k, n, epilogue, has_bias, m, mode):
    # the W4A4 pipeline's real scales: activations quantized per token, weights per channel, bf16 out
    a_bits, w_bits, a_packed = OPERANDS[mode][:3]
    x = _activation(m, k, seed=m * 7 + k)
    gen = _gen(n + k)
    w = ops.quantize_weight(torch.randn(n, k, device=DEV, generator=gen) * 0.02, bits=w_bits)
    pw = fused_ops.pack_weight(w)
    bias = (torch.randn(n, device=DEV, generator=gen) * 0.1).bfloat16() if has_bias else None
    out_n = n // 2 if epilogue == "swiglu" else n
    residual = torch.randn(m, out_n, device=DEV, generator=gen).bfloat16() if epilogue == "residual" else None
    xq, x_scale, x_zero = triton_fused.fused_quantize_triton(x, a_bits, pack=a_packed)
    w_store = fused_ops.pack_int4_blocks(w.q) if mode.endswith("-blocked") else pw.q
    args = (xq, x_scale, x_zero, w_store, pw.scale, pw.w_sum, bias, residual, epilogue == "swiglu", torch.bfloat16)
    autotuned = (name, m) in AUTOTUNED
    y = triton_fused.fused_linear_triton(*args, config=None if autotuned else _fixed_config(m, mode))
    y_ref, tol = _reference_and_tolerance(args, w, k, epilogue)
    diff = (y.double() - y_ref.double()).abs()
    ok = bool((diff <= tol).all()) and y.shape == y_ref.shape
    report("fused_linear", f"{name} M={m} K={k} N={n} {mode} {epilogue}{' autotuned' if autotuned else ''}", ok,
           max_abs_diff=diff.max().item(), differing=int((y != y_ref).sum()))
    assert ok


# ----------------------------------------------------------------------------------------------
# Dispatch: torch.ops.stq.fused_* on CUDA tensors run the kernels, eager and compiled


def test_ops_dispatch_to_fused_kernels(monkeypatch):
    k, kw = _site_args("llada", "qkv", 17, 3)
    x = _activation(17, k, 3)
    w = fused_ops.pack_weight(ops.quantize_weight(torch.randn(2 * 4096, k, device=DEV) * 0.02, bits=4))
    calls = {"quantize": 0, "linear": 0}
    launch_q, launch_l = triton_fused.fused_quantize_triton, triton_fused.fused_linear_triton

    def counting_quantize(*a, **k_):
        calls["quantize"] += 1
        return launch_q(*a, **k_)

    def counting_linear(*a, **k_):
        calls["linear"] += 1
        return launch_l(*a, **k_)

    def reference_must_not_run(*a, **k_):
        raise AssertionError("the CUDA path ran the reference implementation")

    monkeypatch.setattr(triton_fused, "fused_quantize_triton", counting_quantize)
    monkeypatch.setattr(triton_fused, "fused_linear_triton", counting_linear)
    monkeypatch.setattr(fused_ops, "fused_quantize_reference", reference_must_not_run)
    monkeypatch.setattr(fused_ops, "fused_linear_reference", reference_must_not_run)

    def mlp_in(x):
        q, s, z = torch.ops.stq.fused_quantize(x, 4, **kw)
        return torch.ops.stq.fused_linear(q, s, z, w.q, w.scale, w.w_sum, None, None, True, torch.bfloat16)

    y = mlp_in(x)
    assert calls == {"quantize": 1, "linear": 1}
    torch._dynamo.reset()
    y_compiled = torch.compile(mlp_in, fullgraph=True)(x)
    assert calls["quantize"] >= 2 and calls["linear"] >= 2
    torch.cuda.synchronize()
    ok = torch.equal(y, y_compiled)
    report("dispatch", "torch.ops.stq.fused_* eager+compile M=17", ok)
    assert ok


# ----------------------------------------------------------------------------------------------
# The Gluon W4 kernel (codegen/gluon_w4.py): what fused_linear runs on Hopper for a packed weight
# with int8 activation codes, wherever TMA can read the operands

GLUON_LINEARS = [(name, k, n, epi, bias) for name, k, n, epi, bias in LINEARS if epi != "swiglu"]
GLUON_INT_CASES = [
    *[(name, k, n, m) for name, k, n, _, _ in GLUON_LINEARS for m in (64, 1024, 4096)],
    ("awkward", 1024 + 32, 1000, 300),  # K not a multiple of the 128-code step, N and M not of their tiles
    ("awkward", 96, 72, 65),  # K shorter than one step
]


def _gluon_supported():
    from stq_compiler.codegen import gluon_w4

    a = torch.zeros(64, 128, dtype=torch.int8, device=DEV)
    return gluon_w4.supports(a, torch.zeros(8, 64, dtype=torch.uint8, device=DEV))


needs_gluon = pytest.mark.skipif(not torch.cuda.is_available() or not _gluon_supported(),
                                 reason="the Gluon W4 kernel needs Hopper and Gluon")


@needs_gluon
@pytest.mark.parametrize("name,k,n,m", GLUON_INT_CASES, ids=[f"{c[0]}-K{c[1]}-N{c[2]}-M{c[3]}" for c in GLUON_INT_CASES])
def test_w4_gluon_integer_part_is_exact(name, k, n, m):
    from stq_compiler.codegen import gluon_w4

    for a_bits, blocked in ((4, True), (8, True), (4, False), (8, False)):  # W4A4 (codes one a byte), W4A8
        xq, wq, x_store, w_store, x_zero, w_sum = _codes(m, n, k, a_bits, 4, False, seed=m + k + n + a_bits,
                                                         w_blocked=blocked)
        w_store = w_store.reshape(n, -1)  # the blocked layout as the kernel reads it
        want = _exact_acc(xq, x_zero, wq, w_sum).to(torch.int32).float()
        ones_m, ones_n = torch.ones(m, device=DEV), torch.ones(n, device=DEV)
        assert gluon_w4.supports(x_store, w_store)
        for config in gluon_w4.configs():
            y = torch.empty(m, n, device=DEV)
            gluon_w4.w4_linear_gluon(x_store, w_store, ones_m, x_zero.reshape(-1), ones_n, w_sum, None, None, y, k, config,
                                     blocked=blocked)
            ok = torch.equal(y, want)
            report("w4 gluon", f"{name} M={m} K={k} N={n} A{a_bits} {'blocked' if blocked else 'pairs'} "
                   f"{'x'.join(map(str, config))} int", ok, max_abs_diff=(y - want).abs().max().item())
            assert ok


@needs_gluon
@pytest.mark.parametrize("name,k,n,epilogue,has_bias", GLUON_LINEARS, ids=[c[0] for c in GLUON_LINEARS])
def test_w4_gluon_epilogue_gives_the_triton_kernels_bits(name, k, n, epilogue, has_bias):
    # real scales (activations quantized per token, weights per channel), bias, residual, bf16
    # out: the Gluon kernel runs _epilogue_tile's operations in its order, so the bits must be
    # the Triton kernel's, and within the reference's float32 tolerance
    m = 1024
    x = _activation(m, k, seed=m * 7 + k)
    gen = _gen(n + k)
    w = ops.quantize_weight(torch.randn(n, k, device=DEV, generator=gen) * 0.02, bits=4)
    pw = fused_ops.pack_weight(w)
    bias = (torch.randn(n, device=DEV, generator=gen) * 0.1).bfloat16() if has_bias else None
    residual = torch.randn(m, n, device=DEV, generator=gen).bfloat16() if epilogue == "residual" else None
    xq, x_scale, x_zero = triton_fused.fused_quantize_triton(x, 4, pack=False)
    args = (xq, x_scale, x_zero, pw.q, pw.scale, pw.w_sum, bias, residual, False, torch.bfloat16)
    blocked_args = (*args[:3], fused_ops.pack_int4_blocks(w.q), *args[4:])  # what the fusion pass emits
    y_blocked = triton_fused.fused_linear_triton(*blocked_args)  # no config: the Gluon kernel
    y = triton_fused.fused_linear_triton(*args)
    y_triton = triton_fused.fused_linear_triton(*args, config=_fixed_config(m, "w4a4-bytes"))
    y_ref, tol = _reference_and_tolerance(args, w, k, epilogue)
    diff = (y.double() - y_ref.double()).abs()
    ok = torch.equal(y, y_triton) and torch.equal(y_blocked, y_triton) and bool((diff <= tol).all())
    report("w4 gluon", f"{name} M={m} K={k} N={n} {epilogue}", ok, max_abs_diff=diff.max().item(),
           differing_from_triton=int((y != y_triton).sum()), blocked_differing=int((y_blocked != y_triton).sum()))
    assert ok


GLUON_SWIGLU = [*[(name, k, n, bias, 1024) for name, k, n, epi, bias in LINEARS if epi == "swiglu"],
                ("awkward", 1024 + 32, 2 * 500, True, 300),  # N = 500 outputs: the last tile's gate rows read up rows
                ("awkward", 96, 2 * 72, False, 65)]


@needs_gluon
@pytest.mark.parametrize("name,k,n,has_bias,m", GLUON_SWIGLU, ids=[f"{c[0]}-K{c[1]}-N{c[2]}" for c in GLUON_SWIGLU])
def test_w4_gluon_swiglu_gives_the_triton_kernels_bits(monkeypatch, name, k, n, has_bias, m):
    # gate/up as one GEMM with silu(gate) * up in the epilogue: a Gluon tile holds gate rows above
    # the matching up rows (two TMA loads a step) and runs the Triton SwiGLU kernel's float32
    # operations in its order, so the bits must be that kernel's, and within the reference's
    # float32 tolerance (1e-5 relative through the sigmoid)
    from stq_compiler.codegen import gluon_w4

    calls = []
    launch = gluon_w4.w4_linear_gluon
    monkeypatch.setattr(gluon_w4, "w4_linear_gluon", lambda *a, **kw: calls.append(kw.get("swiglu")) or launch(*a, **kw))
    x = _activation(m, k, seed=m * 7 + k)
    gen = _gen(n + k)
    w = ops.quantize_weight(torch.randn(n, k, device=DEV, generator=gen) * 0.02, bits=4)
    bias = (torch.randn(n, device=DEV, generator=gen) * 0.1).bfloat16() if has_bias else None
    xq, x_scale, x_zero = triton_fused.fused_quantize_triton(x, 4, pack=False)
    args = (xq, x_scale, x_zero, fused_ops.pack_int4_blocks(w.q), w.scale, w.w_sum, bias, None, True, torch.bfloat16)
    config = next(c for c in _configs("w4a4-blocked") if triton_fused.w4_swiglu_fits(c) and c.kwargs["BLOCK_M"] >= 64)
    y_triton = triton_fused.fused_linear_triton(*args, config=config)
    y = triton_fused.fused_linear_triton(*args)  # no config: the Gluon kernel
    y_ref, tol = _reference_and_tolerance(args, w, k, "swiglu")
    diff = (y.double() - y_ref.double()).abs()
    ok = calls == [True] and torch.equal(y, y_triton) and bool((diff <= tol).all())
    report("w4 gluon", f"{name} M={m} K={k} N={n} swiglu{' bias' if has_bias else ''}", ok, gluon_calls=len(calls),
           max_abs_diff=diff.max().item(), differing_from_triton=int((y != y_triton).sum()))
    assert ok


@needs_gluon
def test_fused_linear_runs_the_gluon_kernel_where_tma_can_read(monkeypatch):
    from stq_compiler.codegen import gluon_w4

    calls = []
    launch = gluon_w4.w4_linear_gluon

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return launch(*a, **kw)

    monkeypatch.setattr(gluon_w4, "w4_linear_gluon", counting)
    for m, k, expected in ((1024, 4096, True), (7, 4096, False), (300, 1036, False)):  # 518-byte rows: no TMA
        _, _, x_store, w_store, x_zero, w_sum = _codes(m, 256, k, 4, 4, False, seed=5)
        calls.clear()
        y = triton_fused.fused_linear_triton(x_store, torch.ones(m, 1, device=DEV), x_zero, w_store,
                                             torch.ones(256, device=DEV), w_sum, None, None, False, torch.float32)
        want = triton_fused.fused_linear_triton(x_store, torch.ones(m, 1, device=DEV), x_zero, w_store,
                                                torch.ones(256, device=DEV), w_sum, None, None, False, torch.float32,
                                                config=_fixed_config(m, "w4a4-bytes"))
        ok = bool(calls) == expected and torch.equal(y, want)
        report("w4 gluon", f"dispatch M={m} K={k} gluon={bool(calls)}", ok)
        assert ok


@pytest.mark.parametrize("m,bits", [(1, 4), (7, 8), (1024, 4), (4096, 4)])
def test_chunk_kernel_at_dreams_down_site(monkeypatch, m, bits):
    # _chunk_kron_quantize_kernel, which ran Dream-7B's down site until the split kernel did
    # (SPLIT_TOKEN_ROWS; test_fused_quantize_real_shapes runs that site through the split kernel,
    # "token-split") and still runs tiles the split kernel does not take: against the reference,
    # and the same bits with the factors split ahead
    monkeypatch.setattr(triton_fused, "SPLIT_TOKEN_ROWS", False)
    assert triton_fused.token_split(128, 148) is None and triton_fused._kron_chunked(128, 148)
    seed = zlib.crc32(repr(("chunk", m, bits)).encode()) % 100003
    k, kw = _site_args("dream", "down", m, seed)
    x = _activation(m, k, seed)
    got = triton_fused.fused_quantize_triton(x, bits, **kw)
    torch.cuda.synchronize()
    cpu = {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    want = fused_ops.fused_quantize_reference(x.cpu(), bits, **cpu)
    ok, numbers = code_agreement(got, want, reference_values(x.cpu(), **cpu), k, bits)
    triton_fused.PRESPLIT_LAUNCHES.clear()
    triton_fused.prepare_factor_splits(kw["p1"], kw["p2"])  # (the test's factors are not contiguous)
    same = all(torch.equal(a, b) for a, b in zip(got, triton_fused.fused_quantize_triton(x, bits, **kw)))
    report("fused_quantize", f"dream down M={m} K={k} a{bits} chunk-kron", ok, presplit_same=same,
           launches=dict(triton_fused.PRESPLIT_LAUNCHES), **numbers)
    assert ok and same and triton_fused.PRESPLIT_LAUNCHES == {"presplit": 1}
