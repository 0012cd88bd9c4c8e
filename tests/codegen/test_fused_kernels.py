"""The fused Triton kernels (``stq_compiler.codegen.triton_fused``) against the reference ops of
``stq_compiler.fused_ops``, on CPU under the Triton interpreter, at tiny shapes.

Like ``test_triton_rtn.py``, this file re-runs itself in a subprocess with ``TRITON_INTERPRET=1``
(the variable is read when kernels are defined, process-wide).

Agreement criteria (fresh random inputs each case, seeded by the case):

* integer GEMM: exact (unit scales, float32 output holds the int32 accumulator exactly);
* GEMM epilogue: within 1e-6 of the terms' magnitude plus one output ulp (FMA contraction is
  off, so in practice bit-exact), 1e-5 with SwiGLU (``exp`` and the division may differ by an ulp);
* activation kernel: bit-exact without float stages (gate and quantize only) or with exact
  transforms (signed permutations); with float stages (norm, TAC, Kronecker) codes may move only
  next to a rounding tie, by the float error bound of ``tests/codegen/code_agreement.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
REPO_ROOT = Path(__file__).resolve().parents[2]


if not INTERPRETING:

    def test_module_imports_and_registers_without_interpreter():
        from stq_compiler.codegen import triton_fused

        assert not triton_fused.INTERPRET
        triton_fused.register_cuda_kernels()
        triton_fused.register_cuda_kernels()  # idempotent
        sources = triton_fused.kernel_sources()
        assert "_times_factor(" in sources["_fused_quantize_kernel"] and "_dot_f32(" in sources["_times_factor"]
        assert "_dot_f32(" in sources["_token_kron_quantize_kernel"]
        assert triton_fused.KRON_PRECISION in ("bf16x3", "tf32x3", "ieee")  # never plain TF32 or bfloat16
        assert "tl.dot" in sources["_fused_linear_kernel_body"]

    def test_factor_split_is_kept_per_tensor_and_version():
        # _bf16_split: the chunk kernel's pre-split factors, made once per factor tensor and
        # version (hi + lo within 2^-16 of the value, both bfloat16 rounded to nearest even)
        from stq_compiler.codegen import triton_fused

        p = torch.randn(20, 20, generator=torch.Generator().manual_seed(3))
        hi, lo = triton_fused._bf16_split(p)
        assert hi.dtype == lo.dtype == torch.bfloat16
        assert torch.equal(hi, p.to(torch.bfloat16)) and torch.equal(lo, (p - hi.float()).to(torch.bfloat16))
        assert ((hi.float() + lo.float() - p).abs() <= 2.0**-16 * p.abs()).all()
        assert triton_fused._bf16_split(p)[0] is hi  # kept
        hi_t, _ = triton_fused._bf16_split(p, transpose=True)
        assert torch.equal(hi_t, hi.t()) and hi_t.is_contiguous()
        p.mul_(2.0)  # a new version: split again
        assert torch.equal(triton_fused._bf16_split(p)[0], p.to(torch.bfloat16))
        assert triton_fused._bf16_split(p)[0] is not hi
        key = id(p)
        del p, hi, lo, hi_t
        assert key not in triton_fused._SPLITS  # dropped with the factor
        # what the launchers of CUDA factors ask: made ahead (the fusion pass), or None
        q = torch.randn(8, 8)
        assert triton_fused._bf16_split(q, make=False) is None
        triton_fused.prepare_factor_splits(q)
        assert torch.equal(triton_fused._bf16_split(q, True, make=False)[0], q.t().to(torch.bfloat16))
        assert triton_fused._presplit_parts(True, (q, False), (q, True))[2] is triton_fused._bf16_split(q, True)[0]
        assert triton_fused._presplit_parts(False, (q, False)) is None

    def test_kernels_match_reference_in_triton_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-rs", "-p", "no:cacheprovider"],
            check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode == 5 or (proc.returncode == 0 and "passed" not in summary):
            pytest.skip(f"interpreter tests skipped themselves: {proc.stdout.strip()[-400:]}")
        assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr}"
        print(summary)

else:
    import triton
    import triton.language as tl

    from stq_compiler import fused_ops, ops
    from stq_compiler.codegen import triton_fused
    from stq_compiler.codegen.triton_fused import (
        fused_linear_triton,
        fused_quantize_triton,
    )
    from tests.codegen.code_agreement import code_agreement, reference_values

    @triton.jit
    def _count_to(out_ptr, n):
        total = 0
        for _ in range(0, n, 1):
            total += 1
        tl.store(out_ptr, total)

    def _interpreter_loops_to_runtime_bounds() -> bool:
        # Triton 3.6's interpreter cannot loop to a runtime bound with NumPy >= 2.5 (see test_triton_rtn).
        out = torch.zeros(1, dtype=torch.int32)
        try:
            _count_to[(1,)](out, 3)
        except Exception:  # noqa: BLE001 (any failure means: cannot)
            return False
        return int(out) == 3

    if not _interpreter_loops_to_runtime_bounds():
        pytest.skip(
            f"Triton {triton.__version__}'s interpreter cannot loop to a runtime bound with this NumPy",
            allow_module_level=True,
        )

    def _gen(*case):
        return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))

    def test_kernels_are_interpreted():
        assert triton_fused.INTERPRET

    # ------------------------------------------------------------------------------------------
    # fused_quantize

    def _orthogonal(n, gen):
        return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0].float()

    def _signed_permutation(n, gen):
        perm = torch.randperm(n, generator=gen)
        signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
        return torch.eye(n)[perm] * signs[:, None]

    def _activation(m, k, dtype, gen):
        x = torch.randn(m, k, generator=gen)
        x[:, torch.randint(0, k, (2,), generator=gen)] *= 30.0  # outlier channels
        if m >= 3:
            x[1] = x[1].abs()  # a one-signed token
        return x.to(dtype)

    def _stage_args(stages, m, k, kron, gen, dtype):
        """Keyword arguments of stq::fused_quantize for the named stages."""
        kw = {}
        if "norm" in stages or "norm_w" in stages:
            kw["rms_eps"] = 1e-5
        if "norm_w" in stages:
            kw["norm_weight"] = (torch.rand(k, generator=gen) + 0.5).to(dtype)
        if "tac" in stages:
            g = 8 if k % 8 == 0 else 1
            eye = torch.eye(g).expand(k // g, g, g)
            kw["tac_m"] = 0.55 * eye + 0.45 * torch.randn(k // g, g, g, generator=gen) / g**0.5
            kw["tac_d"] = torch.randn(k, generator=gen) * 0.1
        if "smooth" in stages:
            kw["inv_smooth"] = torch.rand(k, generator=gen) + 0.25
        if "kron" in stages:
            kw["p1"], kw["p2"] = _orthogonal(kron[0], gen), _orthogonal(kron[1], gen)
        if "gate" in stages:
            kw["is_masked"] = torch.rand(m, generator=gen) < 0.5
            kw["gate_masked"] = (torch.rand(k, generator=gen) < 0.9).float()
            kw["gate_unmasked"] = (torch.rand(k, generator=gen) < 0.9).float()
        return kw

    def assert_codes_agree(got, x, bits, kw, pack=True, exact=False):
        """The kernel's output ``got`` for ``fused_quantize(x, bits, **kw, pack=pack)`` against the
        reference: bit-exact, or as ``tests/codegen/code_agreement.py`` requires."""
        want = fused_ops.fused_quantize_reference(x, bits, **kw, pack=pack)
        (q, scale, zero), (q_ref, scale_ref, zero_ref) = got, want
        assert q.dtype == q_ref.dtype and q.shape == q_ref.shape
        assert scale.shape == scale_ref.shape and zero.shape == zero_ref.shape
        assert scale.dtype == torch.float32 and zero.dtype == torch.int32
        if exact:
            assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref) and torch.equal(zero, zero_ref)
            return
        ok, numbers = code_agreement(got, want, reference_values(x, **kw), x.shape[-1], bits)
        assert ok, numbers

    STAGE_SETS = [
        (),
        ("gate",),
        ("norm",),
        ("norm_w",),
        ("tac",),
        ("smooth",),
        ("kron",),
        ("norm", "kron", "gate"),  # q/k/v and gate/up sites (norm weight folded into W)
        ("tac", "kron", "gate"),  # o_proj site
        ("norm_w", "tac", "smooth", "kron", "gate"),  # everything
    ]

    # activation bits, 4-bit codes packed two a byte or kept one a byte (as the fusion pass does)
    STORAGE = [(4, True), (4, False), (8, True)]

    def _storage_id(s):
        return f"a{s[0]}" + ("-bytes" if s[0] == 4 and not s[1] else "")

    @pytest.mark.parametrize("bits,pack", STORAGE, ids=[_storage_id(s) for s in STORAGE])
    @pytest.mark.parametrize("stages", STAGE_SETS, ids=lambda s: "+".join(s) or "quantize")
    def test_fused_quantize_stages(stages, bits, pack):
        # K = 48 = 6 x 8 (d1 padded to 16 in the kernel), 13 tokens: several per program, partial block
        m, k, kron = 13, 48, (6, 8)
        gen = _gen("stages", stages, bits)
        x = _activation(m, k, torch.bfloat16, gen)
        kw = _stage_args(stages, m, k, kron, gen, torch.bfloat16)
        got = fused_quantize_triton(x, bits, **kw, pack=pack)
        float_stages = {"norm", "norm_w", "tac", "kron"} & set(stages)
        assert_codes_agree(got, x, bits, kw, pack, exact=not float_stages)

    @pytest.mark.parametrize("bits,pack", STORAGE, ids=[_storage_id(s) for s in STORAGE])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
    @pytest.mark.parametrize(
        "m,k,kron",
        [(1, 64, (8, 8)), (7, 45, None), (5, 1, None), (9, 30, (5, 6)), (3, 40, (2, 20)), (17, 256, (16, 16))],
        ids=lambda v: str(v),
    )
    def test_fused_quantize_shapes(m, k, kron, dtype, bits, pack):
        # M = 1, odd M, odd K (a padded nibble), K = 1, padded factors, several tokens a program.
        if kron == (5, 6) and bits == 4 and not pack:
            kron = (6, 5)  # an odd d2 is allowed when nothing is packed
        gen = _gen("shapes", m, k, kron, dtype, bits)
        stages = ("norm_w", "gate") + (("kron",) if kron else ())
        x = _activation(m, k, dtype, gen)
        kw = _stage_args(stages, m, k, kron, gen, dtype)
        got = fused_quantize_triton(x, bits, **kw, pack=pack)
        packed = bits == 4 and pack
        assert got[0].shape == ((m, (k + 1) // 2) if packed else (m, k))
        assert got[0].dtype == (torch.uint8 if packed else torch.int8)
        assert_codes_agree(got, x, bits, kw, pack)

    @pytest.mark.parametrize("bits", [4, 8])
    def test_fused_quantize_exact_with_exact_transforms(bits):
        # Signed permutations for P1, P2 and a permutation-like TAC: every float product is by ±1
        # or 0 and every sum has one nonzero term, so the kernel must equal the reference bit for bit.
        # bfloat16 inputs: the bf16x3 Kronecker splits them exactly (hi = x, lo = 0). (After float
        # stages the quantizer multiplies by 1 / scale, within 1.5 ulp of the reference's division:
        # that could move a code only within that distance of a rounding tie; these seeded values
        # have none, and a wrong permutation, gate or scale moves codes anywhere.)
        m, k = 11, 48
        gen = _gen("exact", bits)
        x = _activation(m, k, torch.bfloat16, gen)
        kw = _stage_args(("gate",), m, k, None, gen, torch.bfloat16)
        kw["p1"], kw["p2"] = _signed_permutation(6, gen), _signed_permutation(8, gen)
        kw["tac_m"] = torch.stack([_signed_permutation(8, gen) for _ in range(k // 8)])
        kw["tac_d"] = torch.zeros(k)
        got = fused_quantize_triton(x, bits, **kw)
        assert_codes_agree(got, x, bits, kw, exact=True)

    def test_fused_quantize_matches_unfused_ops_without_float_stages():
        # gate + quantize only: the same codes as stq::quantize_per_token, packed.
        gen = _gen("unfused")
        x = _activation(6, 33, torch.float16, gen)
        kw = _stage_args(("gate",), 6, 33, None, gen, torch.float16)
        q, scale, zero = fused_quantize_triton(x, 4, **kw)
        q_ref, scale_ref, zero_ref = ops.quantize_per_token_reference(x, 4, kw["is_masked"], kw["gate_masked"], kw["gate_unmasked"])
        assert torch.equal(fused_ops.unpack_int4(q, 33), q_ref)
        assert torch.equal(scale, scale_ref) and torch.equal(zero, zero_ref)
        q_bytes, _, _ = fused_quantize_triton(x, 4, **kw, pack=False)
        assert torch.equal(q_bytes, q_ref)

    def test_fused_quantize_divides_exactly_without_float_stages():
        # Values whose v / scale is a rounding tie when divided correctly but not when multiplied
        # by 1 / scale (what the kernels do after float stages): without float stages the codes
        # must still be the reference's, so the kernel must divide.
        gen = torch.Generator().manual_seed(7)
        ties = []
        while len(ties) < 4:
            hi = torch.tensor(15 * (0.01 + 3 * torch.rand(1, generator=gen).item()), dtype=torch.float32)
            scale = hi / 15.0  # the reference's scale of a token with min 0 and max hi
            k = int(torch.randint(0, 15, (1,), generator=gen))
            v = (k + 0.5) * scale
            if v / scale == k + 0.5 and torch.floor(v * (1.0 / scale) + 0.5) != torch.floor(v / scale + 0.5):
                ties.append((hi, v))
        x = torch.zeros(len(ties), 16)
        for row, (hi, v) in enumerate(ties):
            x[row, 3], x[row, 9] = hi, v
        is_masked = torch.tensor([True, False] * (len(ties) // 2))
        ones = torch.ones(16)
        got = fused_quantize_triton(x, 4, is_masked=is_masked, gate_masked=ones, gate_unmasked=ones, pack=False)
        want = ops.quantize_per_token_reference(x, 4, is_masked, ones, ones)
        assert all(torch.equal(a, b) for a, b in zip(got, want))

    def _launch_grids(monkeypatch, kernel_name):
        """The grids ``triton_fused.<kernel_name>`` is launched with from now on (a list that fills)."""
        launched = []
        kernel = getattr(triton_fused, kernel_name)
        monkeypatch.setattr(triton_fused, kernel_name,
                            type("Spy", (), {"__getitem__": lambda self, grid: launched.append(grid) or kernel[grid]})())
        return launched

    TOKEN_STAGE_SETS = [("kron",), ("kron", "gate"), ("norm", "kron", "gate"), ("norm_w", "smooth", "kron", "gate"),
                        ("tac", "kron", "gate")]

    @pytest.mark.parametrize("bits,pack", STORAGE, ids=[_storage_id(s) for s in STORAGE])
    @pytest.mark.parametrize("stages", TOKEN_STAGE_SETS, ids=lambda s: "+".join(s))
    def test_fused_quantize_one_token_a_program(monkeypatch, stages, bits, pack):
        # Factors above MAX_FUSED_KRON_TILE (LLaDA-8B's down site on the GPU): _token_kron_quantize_kernel,
        # here at (6, 8) padded to 16 x 16 with the limit lowered, and at (20, 24) padded to 32 x 32.
        monkeypatch.setattr(triton_fused, "MAX_FUSED_KRON_TILE", 128)
        launched = _launch_grids(monkeypatch, "_token_kron_quantize_kernel")
        for m, kron in ((5, (6, 8)), (3, (20, 24))):
            k = kron[0] * kron[1]
            gen = _gen("token", stages, bits, m)
            x = _activation(m, k, torch.bfloat16, gen)
            kw = _stage_args(stages, m, k, kron, gen, torch.bfloat16)
            got = fused_quantize_triton(x, bits, **kw, pack=pack)
            assert_codes_agree(got, x, bits, kw, pack)
        assert launched == [(5,), (3,)]

    @pytest.mark.parametrize("kernel", ["fused", "token", "chunks"])
    def test_factors_split_ahead_or_in_the_kernel_give_the_same_bits(monkeypatch, kernel):
        # The bfloat16 hi + lo of the factors made on the host (_bf16_split) hold the values the
        # kernels' own split makes, and enter the same products in the same order: bit for bit
        # the same codes, scales and zeros, for each Kronecker kernel, with and without a norm
        # (a bfloat16 input with no float stage has a zero lo part, X_IS_BF16)
        flag, kron = {"fused": ("FUSED_KRON_PRESPLIT", (4, 8)), "token": ("TOKEN_KRON_PRESPLIT", (20, 24)),
                      "chunks": ("CHUNK_KRON_PRESPLIT", (6, 40))}[kernel]
        if kernel == "chunks":
            monkeypatch.setattr(triton_fused, "MAX_FUSED_KRON_TILE", 64)
            monkeypatch.setattr(triton_fused, "MAX_TOKEN_KRON_TILE", 128)
            monkeypatch.setattr(triton_fused, "KRON_CHUNK", 16)
            monkeypatch.setattr(triton_fused, "MAX_CHUNK_KRON_D1", 16)
        elif kernel == "token":
            monkeypatch.setattr(triton_fused, "MAX_FUSED_KRON_TILE", 128)
        for stages in (("kron", "gate"), ("norm", "kron", "gate")):
            m, k = 5, kron[0] * kron[1]
            gen = _gen("presplit", kernel, stages)
            x = _activation(m, k, torch.bfloat16, gen)
            kw = _stage_args(stages, m, k, kron, gen, torch.bfloat16)
            got = {}
            for presplit in (True, False):
                monkeypatch.setattr(triton_fused, flag, presplit)
                triton_fused.PRESPLIT_LAUNCHES.clear()
                got[presplit] = fused_quantize_triton(x, 4, **kw)
                # CPU factors are split by the launcher when wanted
                assert triton_fused.PRESPLIT_LAUNCHES == ({"presplit": 1} if presplit else {})
            assert all(torch.equal(a, b) for a, b in zip(got[True], got[False]))
            assert_codes_agree(got[True], x, 4, kw, True)

    def test_token_row_blocks(monkeypatch):
        # on by default (SPLIT_TOKEN_ROWS): two power-of-two blocks of at least MIN_SPLIT_BLOCK
        # (64: no dot 16 or 32 wide, Triton's Hopper bug) where they are fewer than the padded
        # rows; off, never
        assert triton_fused.SPLIT_TOKEN_ROWS and triton_fused.MIN_SPLIT_BLOCK == 64
        monkeypatch.setattr(triton_fused, "SPLIT_TOKEN_ROWS", False)
        assert triton_fused.token_split(96, 128) is None and triton_fused.token_split(128, 148) is None
        assert triton_fused.token_row_blocks(148) is None
        monkeypatch.setattr(triton_fused, "SPLIT_TOKEN_ROWS", True)
        assert triton_fused.token_row_blocks(96) is None  # LLaDA-8B's down site: 64 + 64 is its padding
        assert triton_fused.token_row_blocks(148) == (128, 64)  # Dream-7B's down site, columns
        assert triton_fused.token_row_blocks(320) == (256, 64)
        assert triton_fused.token_split(96, 128) is None
        assert triton_fused.token_split(128, 148) == (True, 128, 64)
        assert triton_fused.token_row_blocks(192) == (128, 64)
        for d1 in (40, 100, 128, 200):  # blocks below 64, or no fewer rows
            assert triton_fused.token_row_blocks(d1) is None, d1
        monkeypatch.setattr(triton_fused, "MIN_SPLIT_BLOCK", 16)  # as the interpreter tests run it
        assert triton_fused.token_row_blocks(96) == (64, 32)
        assert triton_fused.token_row_blocks(40) == (32, 16)
        assert triton_fused.token_row_blocks(48) == (32, 16)
        assert triton_fused.token_row_blocks(33) == (32, 16)
        assert triton_fused.token_row_blocks(148) == (128, 32)
        assert triton_fused.token_split(96, 128) == (False, 64, 32)
        assert triton_fused.token_split(128, 148) == (True, 128, 32)
        assert triton_fused.token_split(128, 128) is None and triton_fused.token_split(64, 64) is None
        for d1 in (6, 16, 20, 64, 128, 56):  # a power of two, too small, or no fewer rows
            assert triton_fused.token_row_blocks(d1) is None, d1

    @pytest.mark.parametrize("bits,pack", STORAGE, ids=[_storage_id(s) for s in STORAGE])
    @pytest.mark.parametrize("stages", TOKEN_STAGE_SETS, ids=lambda s: "+".join(s))
    def test_fused_quantize_one_token_a_program_in_row_blocks(monkeypatch, stages, bits, pack):
        # One side of the token as two power-of-two blocks: _token_kron_split_kernel. The rows
        # (LLaDA-8B's down site: 96 = 64 + 32) at (48, 8) as 32 + 16 rows (no padding rows; 8
        # columns padded to 16) and at (40, 6) as 32 + 16 (the second block half padding); the
        # columns (Dream-7B's: 148 = 128 + 32) at (8, 48) and (6, 40); limit lowered
        monkeypatch.setattr(triton_fused, "SPLIT_TOKEN_ROWS", True)
        monkeypatch.setattr(triton_fused, "MIN_SPLIT_BLOCK", 16)  # blocks this small only here (Hopper bug)
        monkeypatch.setattr(triton_fused, "MAX_FUSED_KRON_TILE", 128)
        launched = _launch_grids(monkeypatch, "_token_kron_split_kernel")
        for m, kron in ((3, (48, 8)), (2, (40, 6)), (3, (8, 48)), (2, (6, 40))):
            k = kron[0] * kron[1]
            gen = _gen("token-blocks", stages, bits, m, kron)
            x = _activation(m, k, torch.bfloat16, gen)
            kw = _stage_args(stages, m, k, kron, gen, torch.bfloat16)
            got = fused_quantize_triton(x, bits, **kw, pack=pack)
            assert_codes_agree(got, x, bits, kw, pack)
        assert launched == [(3,), (2,), (3,), (2,)]

    @pytest.mark.parametrize("stages", [("kron", "gate"), ("norm", "kron", "gate")], ids=lambda s: "+".join(s))
    def test_fused_quantize_in_blocks_of_the_default_width(monkeypatch, stages):
        # the split kernel as it would run on the GPU (MIN_SPLIT_BLOCK = 64, Dream-7B's down
        # site as 128 + 64 columns): here 136 columns (6 x 136) and 136 rows (136 x 6) as 128 + 64;
        # limit lowered
        monkeypatch.setattr(triton_fused, "SPLIT_TOKEN_ROWS", True)
        monkeypatch.setattr(triton_fused, "MAX_FUSED_KRON_TILE", 128)
        launched = _launch_grids(monkeypatch, "_token_kron_split_kernel")
        for m, kron in ((3, (6, 136)), (2, (136, 6))):
            assert triton_fused.token_split(*kron)[1:] == (128, 64)
            k = kron[0] * kron[1]
            gen = _gen("token-blocks-64", stages, kron)
            x = _activation(m, k, torch.bfloat16, gen)
            kw = _stage_args(stages, m, k, kron, gen, torch.bfloat16)
            assert_codes_agree(fused_quantize_triton(x, 4, **kw), x, 4, kw, True)
        assert launched == [(3,), (2,)]

    def test_fused_quantize_row_blocks_exact_with_exact_transforms(monkeypatch):
        # The row-block kernel with signed permutations (every product by ±1 or 0, one nonzero
        # term a sum, across the blocks too; bfloat16 inputs split exactly): bit for bit the
        # reference's codes, scales and zeros
        monkeypatch.setattr(triton_fused, "SPLIT_TOKEN_ROWS", True)
        monkeypatch.setattr(triton_fused, "MIN_SPLIT_BLOCK", 16)  # blocks this small only here (Hopper bug)
        monkeypatch.setattr(triton_fused, "MAX_FUSED_KRON_TILE", 128)
        launched = _launch_grids(monkeypatch, "_token_kron_split_kernel")
        for m, kron in ((4, (40, 6)), (3, (6, 40))):  # rows split, columns split
            k = kron[0] * kron[1]
            gen = _gen("blocks-exact", kron)
            x = _activation(m, k, torch.bfloat16, gen)
            kw = _stage_args(("gate",), m, k, None, gen, torch.bfloat16)
            kw["p1"], kw["p2"] = _signed_permutation(kron[0], gen), _signed_permutation(kron[1], gen)
            for bits in (4, 8):
                assert_codes_agree(fused_quantize_triton(x, bits, **kw), x, bits, kw, exact=True)
        assert len(launched) == 4

    @pytest.mark.parametrize("bits,pack", STORAGE, ids=[_storage_id(s) for s in STORAGE])
    @pytest.mark.parametrize("stages", TOKEN_STAGE_SETS, ids=lambda s: "+".join(s))
    def test_fused_quantize_second_factor_in_chunks(monkeypatch, stages, bits, pack):
        # Factors above MAX_TOKEN_KRON_TILE with a first factor that fits (Dream-7B's down site on
        # the GPU, 128 x 148): _chunk_kron_quantize_kernel, here with the limits lowered and
        # 16-column chunks: (6, 40) padded to 16 x 48 (three chunks, the last one partial) over 5
        # tokens and 2 programs (3 and 2 tokens each), and (12, 32) in two full chunks over 1 token.
        monkeypatch.setattr(triton_fused, "MAX_FUSED_KRON_TILE", 64)
        monkeypatch.setattr(triton_fused, "MAX_TOKEN_KRON_TILE", 128)
        monkeypatch.setattr(triton_fused, "MAX_TOKEN_SPLIT_TILE", 0)  # no split tile: the chunks
        monkeypatch.setattr(triton_fused, "KRON_CHUNK", 16)
        monkeypatch.setattr(triton_fused, "MAX_CHUNK_KRON_D1", 16)
        launched = _launch_grids(monkeypatch, "_chunk_kron_quantize_kernel")
        for m, kron in ((5, (6, 40)), (1, (12, 32))):
            k = kron[0] * kron[1]
            gen = _gen("chunks", stages, bits, m)
            x = _activation(m, k, torch.bfloat16, gen)
            kw = _stage_args(stages, m, k, kron, gen, torch.bfloat16)
            got = fused_quantize_triton(x, bits, **kw, pack=pack)
            assert_codes_agree(got, x, bits, kw, pack)
        assert launched == [(2,), (1,)]

    def test_fused_quantize_chunks_exact_with_exact_transforms(monkeypatch):
        # The chunked kernel with signed permutations (every product by ±1 or 0, one nonzero term a
        # sum; bfloat16 inputs split exactly): bit for bit the reference's codes, scales and zeros
        # (1 / scale as in test_fused_quantize_exact_with_exact_transforms).
        monkeypatch.setattr(triton_fused, "MAX_FUSED_KRON_TILE", 64)
        monkeypatch.setattr(triton_fused, "MAX_TOKEN_KRON_TILE", 128)
        monkeypatch.setattr(triton_fused, "MAX_TOKEN_SPLIT_TILE", 0)  # no split tile: the chunks
        monkeypatch.setattr(triton_fused, "KRON_CHUNK", 16)
        monkeypatch.setattr(triton_fused, "MAX_CHUNK_KRON_D1", 16)
        m, kron = 7, (6, 40)
        k = kron[0] * kron[1]
        gen = _gen("chunks-exact")
        x = _activation(m, k, torch.bfloat16, gen)
        kw = _stage_args(("gate",), m, k, None, gen, torch.bfloat16)
        kw["p1"], kw["p2"] = _signed_permutation(kron[0], gen), _signed_permutation(kron[1], gen)
        for bits in (4, 8):
            assert_codes_agree(fused_quantize_triton(x, bits, **kw), x, bits, kw, exact=True)

    @pytest.mark.parametrize("stages", [("kron", "gate"), ("norm", "kron", "gate"), ("tac", "kron", "gate")],
                             ids=lambda s: "+".join(s))
    def test_fused_quantize_large_kron_falls_back(monkeypatch, stages):
        # Factors above MAX_TOKEN_KRON_TILE with a first factor above MAX_CHUNK_KRON_D1: float
        # stages in PyTorch, then the kernel.
        monkeypatch.setattr(triton_fused, "MAX_FUSED_KRON_TILE", 64)
        monkeypatch.setattr(triton_fused, "MAX_TOKEN_KRON_TILE", 128)
        monkeypatch.setattr(triton_fused, "MAX_TOKEN_SPLIT_TILE", 0)
        monkeypatch.setattr(triton_fused, "MAX_CHUNK_KRON_D1", 8)
        m, k, kron = 5, 48, (6, 8)
        gen = _gen("fallback", stages)
        x = _activation(m, k, torch.bfloat16, gen)
        kw = _stage_args(stages, m, k, kron, gen, torch.bfloat16)
        got = fused_quantize_triton(x, 4, **kw)
        assert_codes_agree(got, x, 4, kw)

    @pytest.mark.parametrize("k,g", [(64, 16), (48, 8), (32, 4), (36, 12), (40, 8)], ids=lambda v: str(v))
    def test_tac_affine_kernel(k, g):
        # TAC's own kernel against stq::tac_block_affine in float64: g = 16 native, 8 and 4
        # embedded in 16 x 16 block-diagonal tiles, 12 (and 40 channels of g = 8: not a multiple
        # of 16) through PyTorch. float32 dots of g terms: within 1e-6 of the terms' magnitude.
        from stq_compiler import tac_ops

        gen = _gen("tac", k, g)
        m = 70  # more than one token tile, the last one partial
        z = _activation(m, k, torch.bfloat16, gen)
        tac_m = torch.randn(k // g, g, g, generator=gen)
        tac_d = torch.randn(k, generator=gen)
        got = triton_fused.tac_affine_triton(z, tac_m, tac_d)
        want = tac_ops.tac_block_affine_reference(z.double(), tac_m.double(), tac_d.double())
        assert got.dtype == torch.float32 and got.shape == (m, k)
        terms = torch.einsum("tbj,bij->tbi", z.double().abs().reshape(m, k // g, g), tac_m.double().abs())
        bound = 1e-6 * terms.reshape(m, k) + 1e-6
        assert ((got.double() - want).abs() <= bound).all()

    def test_fused_quantize_leading_dims_and_noncontiguous():
        gen = _gen("lead")
        x = _activation(2 * 5, 32, torch.float32, gen).reshape(2, 5, 32).transpose(0, 1)  # [5, 2, 32]
        kw = _stage_args(("norm", "kron", "gate"), 10, 32, (4, 8), gen, torch.float32)
        kw["is_masked"] = kw["is_masked"].reshape(5, 2)
        q, scale, zero = fused_quantize_triton(x, 4, **kw)
        assert q.shape == (5, 2, 16) and scale.shape == (5, 2, 1) == zero.shape
        assert_codes_agree((q, scale, zero), x, 4, kw)

    # ------------------------------------------------------------------------------------------
    # fused_linear

    # (M, N, K) under the interpreter's BLOCK_M=32, BLOCK_N=64, BLOCK_K=64 (32 bytes packed):
    # M = 1, odd M over two row tiles, K not a multiple of BLOCK_K, odd K, an even K, N = 1.
    GEMM_SHAPES = [(1, 45, 70), (37, 100, 150), (5, 64, 128), (13, 130, 63), (3, 1, 200)]
    # activation bits, weight bits[, activation packed[, weight blocked]]: both packed, both int8,
    # 8-bit activations on packed 4-bit weights, 4-bit activation codes one a byte on packed
    # weights (with a8w4 this is the transposed W4 kernel), and both of those on the blocked weight
    # layout (fused_ops.pack_int4_blocks: what the fusion pass emits)
    OPERANDS = [(4, 4), (8, 8), (8, 4), (4, 4, False), (4, 4, False, True), (8, 4, False, True)]

    def _operands_id(b):
        return (f"a{b[0]}w{b[1]}" + ("-a-bytes" if len(b) > 2 and not b[2] and b[0] == 4 else "")
                + ("-w-blocked" if len(b) > 3 and b[3] else ""))

    def _operands(m, n, k, a_bits, w_bits, gen, a_packed=None, w_blocked=False):
        """Random codes, their storage (packed for 4 bits), zero points and weight sums."""
        a_lo, a_hi = -(1 << (a_bits - 1)), 1 << (a_bits - 1)
        w_max = (1 << (w_bits - 1)) - 1
        xq = torch.randint(a_lo, a_hi, (m, k), dtype=torch.int8, generator=gen)
        wq = torch.randint(-w_max, w_max + 1, (n, k), dtype=torch.int8, generator=gen)
        x_zero = torch.randint(a_lo, a_hi, (m, 1), dtype=torch.int32, generator=gen)
        w_sum = wq.sum(dim=1, dtype=torch.int32)
        a_packed = a_bits == 4 if a_packed is None else a_packed
        x_store = fused_ops.pack_int4(xq) if a_packed else xq
        if w_blocked:
            w_store = fused_ops.pack_int4_blocks(wq)
        else:
            w_store = fused_ops.pack_int4(wq) if w_bits == 4 else wq
        return xq, wq, x_store, w_store, x_zero, w_sum

    def _integer_reference(xq, x_zero, wq, w_sum):
        return xq.long() @ wq.long().t() - x_zero.long() * w_sum.long()

    @pytest.mark.parametrize("bits", OPERANDS, ids=_operands_id)
    @pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_fused_linear_integer_part_is_exact(mnk, bits):
        m, n, k = mnk
        gen = _gen("int", mnk, bits)
        xq, wq, x_store, w_store, x_zero, w_sum = _operands(m, n, k, *bits[:2], gen, *bits[2:])
        ones_m, ones_n = torch.ones(m, 1), torch.ones(n)
        y = fused_linear_triton(x_store, ones_m, x_zero, w_store, ones_n, w_sum, None, None, False, torch.float32)
        exact = _integer_reference(xq, x_zero, wq, w_sum)
        assert exact.abs().max() < 2**24
        assert torch.equal(y, exact.float())

    def assert_epilogue_close(y, y_ref, magnitude, out_dtype, rel=1e-6):
        """|y - y_ref| <= rel·magnitude + one output ulp of the magnitude (+ tiny)."""
        rel = rel if out_dtype == torch.float32 else rel + torch.finfo(out_dtype).eps
        tol = rel * magnitude + torch.finfo(out_dtype).tiny
        diff = (y.double() - y_ref.double()).abs()
        assert y.dtype == y_ref.dtype == out_dtype and y.shape == y_ref.shape
        assert bool((diff <= tol).all()), f"max abs diff {diff.max().item():.3e}"

    def _epilogue_case(m, n, k, bits, out_dtype, with_bias, epilogue, gen):
        xq, wq, x_store, w_store, x_zero, w_sum = _operands(m, n, k, *bits[:2], gen, *bits[2:])
        x_scale = torch.rand(m, 1, generator=gen) * 0.05 + 1e-3
        w_scale = torch.rand(n, generator=gen) * 0.01 + 1e-4
        bias = (torch.randn(n, generator=gen) * 0.5).to(out_dtype) if with_bias else None
        out_n = n // 2 if epilogue == "swiglu" else n
        residual = torch.randn(m, out_n, generator=gen).to(out_dtype) if epilogue == "residual" else None
        args = (x_store, x_scale, x_zero, w_store, w_scale, w_sum, bias, residual, epilogue == "swiglu", out_dtype)
        y = fused_linear_triton(*args)
        y_ref = fused_ops.fused_linear_reference(*args)
        # magnitude of the float terms, in float64
        lin = (_integer_reference(xq, x_zero, wq, w_sum).double() * x_scale.double() * w_scale.double()).abs()
        if bias is not None:
            lin = lin + bias.double().abs()
        if epilogue == "swiglu":
            magnitude = lin[:, :out_n] * lin[:, out_n:] + lin[:, out_n:]
        elif epilogue == "residual":
            magnitude = lin + residual.double().abs()
        else:
            magnitude = lin
        assert_epilogue_close(y, y_ref, magnitude, out_dtype, rel=1e-5 if epilogue == "swiglu" else 1e-6)

    @pytest.mark.parametrize("epilogue", ["plain", "swiglu", "residual"])
    @pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("bits", OPERANDS, ids=_operands_id)
    def test_fused_linear_epilogues(bits, out_dtype, epilogue):
        gen = _gen("epilogue", bits, out_dtype, epilogue)
        _epilogue_case(37, 140, 75, bits, out_dtype, True, epilogue, gen)

    @pytest.mark.parametrize("bits", [(4, 4), (4, 4, False), (4, 4, False, True)], ids=_operands_id)
    @pytest.mark.parametrize("epilogue", ["swiglu", "residual"])
    @pytest.mark.parametrize("mnk", [(1, 64, 64), (7, 34, 33)], ids=lambda s: "x".join(map(str, s)))
    def test_fused_linear_epilogues_small_shapes_no_bias(mnk, epilogue, bits):
        gen = _gen("small", mnk, epilogue, bits)
        _epilogue_case(*mnk, bits, torch.bfloat16, False, epilogue, gen)

    def test_fused_linear_rejects_bad_arguments():
        gen = _gen("reject")
        _, _, x_store, w_store, x_zero, w_sum = _operands(3, 8, 10, 4, 4, gen)
        ones = torch.ones(3, 1), torch.ones(8)
        with pytest.raises(ValueError):  # 5 bytes of activation, a weight of 4 bytes
            fused_linear_triton(x_store, ones[0], x_zero, w_store[:, :4], ones[1], w_sum, None, None, False, torch.float32)
        with pytest.raises(ValueError):
            fused_linear_triton(x_store, ones[0], x_zero, w_store, ones[1], w_sum, None, torch.ones(3, 4), True, torch.float32)
        xq, wq, _, _, _, _ = _operands(3, 8, 10, 4, 4, gen, a_packed=False)
        blocked = fused_ops.pack_int4_blocks(wq)
        with pytest.raises(ValueError, match="int8 activation codes"):  # blocked weight, packed activations
            fused_linear_triton(x_store, ones[0], x_zero, blocked, ones[1], w_sum, None, None, False, torch.float32)
        with pytest.raises(ValueError, match="input features"):  # 200 codes do not fit one block's 128
            fused_linear_triton(torch.zeros(3, 200, dtype=torch.int8), ones[0], x_zero, blocked, ones[1], w_sum,
                                None, None, False, torch.float32)

    # ------------------------------------------------------------------------------------------
    # The two ops chained, through torch.ops (the kernels run on CPU under the interpreter)

    # Inductor once (a cold CPU compile costs seconds), AOT-eager for the rest.
    COMPILE_BACKEND = {"plain": "inductor", "swiglu": "aot_eager", "residual": "aot_eager"}

    @pytest.mark.parametrize("epilogue", ["plain", "swiglu", "residual"])
    def test_site_chain_through_custom_ops_eager_and_compiled(epilogue):
        gen = _gen("chain", epilogue)
        m, k, n = 9, 64, 96
        x = _activation(m, k, torch.bfloat16, gen).reshape(3, 3, k)
        kw = _stage_args(("norm", "kron", "gate"), m, k, (8, 8), gen, torch.bfloat16)
        kw["is_masked"] = kw["is_masked"].reshape(3, 3)
        w = fused_ops.pack_weight(ops.quantize_weight(torch.randn(n, k, generator=gen), bits=4))
        out_n = n // 2 if epilogue == "swiglu" else n
        residual = torch.randn(3, 3, out_n, generator=gen).bfloat16() if epilogue == "residual" else None

        def site(x, residual):
            q, s, z = torch.ops.stq.fused_quantize(x, 4, **kw)
            return torch.ops.stq.fused_linear(q, s, z, w.q, w.scale, w.w_sum, None, residual, epilogue == "swiglu", torch.bfloat16)

        calls = {"quantize": 0, "linear": 0}
        launch_q, launch_l = triton_fused.fused_quantize_triton, triton_fused.fused_linear_triton

        def counting_quantize(*a, **k_):
            calls["quantize"] += 1
            return launch_q(*a, **k_)

        def counting_linear(*a, **k_):
            calls["linear"] += 1
            return launch_l(*a, **k_)

        mp = pytest.MonkeyPatch()
        mp.setattr(triton_fused, "fused_quantize_triton", counting_quantize)
        mp.setattr(triton_fused, "fused_linear_triton", counting_linear)
        try:
            y = site(x, residual)
            assert calls == {"quantize": 1, "linear": 1}
            torch._dynamo.reset()
            y_compiled = torch.compile(site, fullgraph=True, backend=COMPILE_BACKEND[epilogue])(x, residual)
            assert calls["quantize"] >= 2 and calls["linear"] >= 2
        finally:
            mp.undo()
        assert y.shape == (3, 3, out_n) and torch.equal(y, y_compiled)

        q_ref = fused_ops.fused_quantize_reference(x, 4, **kw)
        y_ref = fused_ops.fused_linear_reference(*q_ref, w.q, w.scale, w.w_sum, None, residual, epilogue == "swiglu", torch.bfloat16)
        # codes may differ at a rounding tie (see assert_codes_agree); compare loosely
        err = (y.float() - y_ref.float()).norm() / y_ref.float().norm()
        assert err < 1e-2, err

    # ------------------------------------------------------------------------------------------
    # A whole fused model graph through the kernels

    @pytest.mark.parametrize("arch", ["llada", "dream"])
    def test_fused_model_graph_runs_on_the_kernels(arch):
        from stq_compiler.analysis import analyze
        from stq_compiler.passes.fuse import fuse_quantized_sites
        from stq_compiler.passes.quantize_linears import quantize_linears
        from stq_compiler.passes.token_state import insert_token_state
        from tests.conftest import capture_graphs, logits_of, sqnr_db, tiny_model

        model = tiny_model(arch, **({"n_layers": 1} if arch == "llada" else {"num_hidden_layers": 1}))
        mask_id = model.config.mask_token_id
        ids = torch.randint(0, mask_id, (2, 9), generator=_gen("model", arch))
        ids[0, 4:] = mask_id
        (gm, inputs), = capture_graphs(model, ids)
        analysis = analyze(gm, inputs)
        gm, _ = insert_token_state(gm, analysis.state_source, mask_id)
        gm, _ = quantize_linears(gm, analysis, 4, 4, gm.meta["stq_token_state"])
        with torch.no_grad():
            reference = logits_of(model(ids))
            unfused = next(o for o in gm(*inputs) if isinstance(o, torch.Tensor) and o.shape == reference.shape)
            gm, _ = fuse_quantized_sites(gm)
            calls = {"n": 0}
            launch = triton_fused.fused_linear_triton

            def counting(*a, **k):
                calls["n"] += 1
                return launch(*a, **k)

            mp = pytest.MonkeyPatch()
            mp.setattr(triton_fused, "fused_linear_triton", counting)
            try:
                fused = next(o for o in gm(*inputs) if isinstance(o, torch.Tensor) and o.shape == reference.shape)
            finally:
                mp.undo()
        assert calls["n"] == 4  # q/k/v stacked; o + residual; gate/up + SwiGLU; down + residual
        assert abs(sqnr_db(reference, fused) - sqnr_db(reference, unfused)) < 1.5
