"""benchmarks/speed.py end to end on tiny models (its --tiny mode): on the CPU, and every row on a GPU."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"
FIELDS = ("model", "row", "method", "bits", "mode", "kind", "batch", "tokens", "latency_ms", "tokens_per_s",
          "speedup_vs_fp16_inductor", "compile_s", "peak_gb", "weight_bytes", "note")


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("speed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _records(out: Path) -> list[dict]:
    records = json.loads(out.read_text())["records"]
    for r in records:
        assert not r.get("error"), r
        assert all(f in r for f in FIELDS), sorted(set(FIELDS) - set(r))
        assert math.isfinite(r["latency_ms"]) and r["latency_ms"] > 0
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["weight_bytes"] > 0
    return records


def test_tiny_run_measures_each_row_of_each_model(speed, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["speed.py", "--tiny"])
    out = tmp_path / "speed.json"
    speed.main(["--tiny", "--out", str(out), "--recipe-dir", str(tmp_path / "recipes")])
    records = _records(out)
    rows = {(r["model"], r["row"], r["mode"]): r for r in records}
    assert set(rows) == {(m, row, mode) for m in ("llada", "dream")
                         for row, mode in (("fp16-eager", "eager"), ("fp16-inductor", "default"), ("starquant-w4a4", "default"),
                                           ("starquant-w4a8", "default"), ("starquant-w4a4-qhead-qembed", "default"))}
    for model in ("llada", "dream"):
        fp, sq = rows[(model, "fp16-inductor", "default")], rows[(model, "starquant-w4a4", "default")]
        assert fp["speedup_vs_fp16_inductor"] == 1.0 and sq["speedup_vs_fp16_inductor"] > 0
        assert (fp["batch"], fp["tokens"], sq["fuse"]) == (1, 64, True)
        assert sq["compile_s"] > 0 and sq["float_weights_released_bytes"] > 0
        # on the CPU a call returns when its work is done: the host time is the latency
        for r in (fp, sq):
            assert r["host_issue_ms"] == r["latency_ms"]
            assert len(r["gc_collections"]) == 3 and all(isinstance(c, int) and c >= 0 for c in r["gc_collections"])
        # the quantized model holds fewer bytes than the float one, and its float block weights are gone
        assert sq["weight_bytes"] < fp["weight_bytes"] - sq["float_weights_released_bytes"] / 2
        assert (tmp_path / "recipes" / sq["recipe_file"]).exists()
        # W4A8: the same 4-bit weights as W4A4, only the activation codes have 8 bits
        w4a8 = rows[(model, "starquant-w4a8", "default")]
        assert (w4a8["bits"], w4a8["weight_bytes"]) == ("W4A8", sq["weight_bytes"]) and w4a8["recipe_file"] != sq["recipe_file"]
        # head and embedding quantized: fewer bytes held, more float ones given back
        q = rows[(model, "starquant-w4a4-qhead-qembed", "default")]
        assert q["weight_bytes"] < sq["weight_bytes"] and q["float_weights_released_bytes"] > sq["float_weights_released_bytes"]
    skipped = json.loads(out.read_text())["skipped"]
    assert {s["row"] for s in skipped} == {"w8a8-int_mm-peer", "fp8-scaled_mm-peer"}
    assert "| starquant-w4a4 |" in out.with_suffix(".md").read_text()


def test_tiny_end_to_end_row_and_resume(speed, tmp_path):
    out = tmp_path / "speed.json"
    argv = ["--tiny", "--models", "llada", "--rows", "fp16-eager", "--e2e", "--out", str(out)]
    speed.main(argv)
    records = _records(out)
    assert [(r["kind"], r["tokens"]) for r in records] == [("step", 64), ("e2e", 16)]
    assert records[1]["e2e_s"] > 0 and records[1]["steps"] == 4
    speed.main(argv + ["--resume"])  # nothing left to run: the records stay
    assert [r["latency_ms"] for r in _records(out)] == [r["latency_ms"] for r in records]


def test_set_overrides_a_constant_for_the_run_only(speed, tmp_path, monkeypatch):
    # --set MODULE.NAME=VALUE: in force while the rows run, named in every row's note and the
    # command, and given back afterwards
    from stq_compiler.codegen import triton_fused

    before = triton_fused.TAC_WARPS
    seen = []
    run = speed.Bench.run
    monkeypatch.setattr(speed.Bench, "run", lambda self, unit: seen.append(triton_fused.TAC_WARPS) or run(self, unit))
    out = tmp_path / "speed.json"
    value = before + 3
    speed.main(["--tiny", "--models", "llada", "--rows", "fp16-eager", "--out", str(out),
                "--set", f"stq_compiler.codegen.triton_fused.TAC_WARPS={value}"])
    assert seen == [value] and triton_fused.TAC_WARPS == before
    result = json.loads(out.read_text())
    [record] = _records(out)
    assert f"set stq_compiler.codegen.triton_fused.TAC_WARPS={value}" in record["note"]
    assert record["overrides"] == [f"stq_compiler.codegen.triton_fused.TAC_WARPS={value}"]
    assert "--set" in result["environment"]["command"]
    # merging that run into a results file would replace production rows: refused unless asked for
    into = tmp_path / "speed-gpu.json"
    with pytest.raises(SystemExit, match="was run with --set stq_compiler.codegen.triton_fused.TAC_WARPS"):
        speed.main(["--merge", str(out), "--out", str(into)])
    assert not into.exists()
    speed.main(["--merge", str(out), "--out", str(into), "--merge-overrides"])
    assert [r["overrides"] for r in json.loads(into.read_text())["records"]] == [record["overrides"]]


def test_merge_refuses_an_older_run_made_with_set(speed, tmp_path):
    # runs written before records named their overrides: the command tells
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"environment": {"date": "d", "command": "python benchmarks/speed.py --set a.B=1 --out x"},
                               "records": []}))
    with pytest.raises(SystemExit, match="--set a.B=1"):
        speed.main(["--merge", str(run), "--out", str(tmp_path / "into.json")])


@pytest.mark.parametrize("text,says", [
    ("stq_compiler.codegen.triton_fused.TAC_WARPS", "MODULE.NAME=VALUE"),
    ("stq_compiler.codegen.no_such_module.X=1", "cannot import"),
    ("stq_compiler.codegen.triton_fused.NO_SUCH_NAME=1", "has no NO_SUCH_NAME"),
    ("stq_compiler.codegen.triton_fused.TAC_WARPS=four", "not a Python literal"),
    ("stq_compiler.codegen.triton_fused.TAC_WARPS=True", "is int"),
])
def test_set_refuses_what_it_cannot_apply(speed, capsys, text, says):
    with pytest.raises(SystemExit):
        speed.parse_args(["--tiny", "--set", text])
    assert says in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_every_row_and_mode_on_the_gpu(speed, tmp_path):
    """The GPU paths before a long run: the peers, CUDA graphs with released weights, end to end."""
    out, recipes = tmp_path / "speed.json", str(tmp_path / "recipes")
    common = ["--tiny", "--models", "llada", "--device", "cuda", "--out", str(out), "--recipe-dir", recipes]
    speed.main(common + ["--rows", *speed.ROWS, "--modes", *speed.MODES])
    speed.main(common + ["--rows", "fp16-inductor", "starquant-w4a4", "--modes", "reduce-overhead", "--e2e", "--resume"])
    records = _records(out)
    assert json.loads(out.read_text())["skipped"] == []
    assert len(records) == 1 + 2 * (len(speed.ROWS) - 1) + 2
    for r in records:
        assert r["peak_gb"] > 0
        assert r["cudagraphs"] == (r["mode"] == "reduce-overhead")
        if r["row"].startswith(("starquant", "w8a8", "fp8")):
            assert r["float_weights_released_bytes"] > 0 and r["weight_bytes"] < r["float_weight_gb"] * 2**30


def test_bench_close_gives_the_models_storage_back(speed):
    # switching models in one run: whatever still refers to the closed model's tensors (on the GPU
    # something compiled did) must not keep their bytes
    args = speed.parse_args(["--tiny"])
    bench = speed.Bench("llada", args)
    tensors = [*bench.model.parameters(), *bench.model.buffers()]
    assert sum(t.untyped_storage().nbytes() for t in tensors) > 0
    bench.close()
    assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
    assert not hasattr(bench, "model")


def test_merge_replaces_rows_and_keeps_older_ones_with_their_own_speedup(speed, tmp_path):
    # --merge: a run's rows replace the file's rows of the same key; a kept row whose float16 row
    # was re-measured keeps the speedup against the float16 row of its own run, marked stale
    def rec(row, ms, mode="reduce-overhead"):
        return {"model": "llada", "row": row, "method": row, "bits": "W4A4", "mode": mode, "kind": "step", "batch": 1,
                "tokens": 1024, "latency_ms": ms, "tokens_per_s": 1024e3 / ms, "note": "", "dtype": "float16"}

    def env(date):
        return {"device": "GPU", "torch": "t", "triton": "tr", "cuda": "c", "torchao": None, "date": date,
                "command": f"python benchmarks/speed.py run-of-{date}"}

    into, run = tmp_path / "speed-gpu.json", tmp_path / "run.json"
    into.write_text(json.dumps({"environment": env("d0"), "skipped": [], "runs": [{"date": "d0", "note": "first"}],
                                "records": speed.with_speedups([rec("fp16-inductor", 10.0), rec("starquant-w4a4", 8.0),
                                                                rec("fp8-scaled_mm-peer", 5.0),
                                                                rec("fp16-inductor", 12.0, "default"),
                                                                rec("starquant-w4a4", 24.0, "default")])}))
    # the run has no default-mode float16 row: its eager row gets no speedup (not one against the
    # file's default-mode row of another run)
    run.write_text(json.dumps({"environment": env("d1"), "records": [rec("fp16-inductor", 9.0), rec("starquant-w4a4", 6.0),
                                                                     rec("fp16-eager", 14.0, "eager")]}))
    speed.main(["--merge", str(run), "--out", str(into), "--note", "second"])
    result = json.loads(into.read_text())
    by = {(r["row"], r["mode"]): r for r in result["records"]}
    assert by[("fp16-inductor", "reduce-overhead")]["latency_ms"] == 9.0
    assert by[("starquant-w4a4", "reduce-overhead")]["speedup_vs_fp16_inductor"] == pytest.approx(9.0 / 6.0)
    peer = by[("fp8-scaled_mm-peer", "reduce-overhead")]
    assert peer["stale"] and peer["speedup_vs_fp16_inductor"] == pytest.approx(10.0 / 5.0)
    default = by[("starquant-w4a4", "default")]  # its float16 row was not re-measured: as it was
    assert not default.get("stale") and default["speedup_vs_fp16_inductor"] == pytest.approx(12.0 / 24.0)
    eager = by[("fp16-eager", "eager")]
    assert eager["latency_ms"] == 14.0 and eager["speedup_vs_fp16_inductor"] is None
    assert len(result["records"]) == 6
    assert [r["note"] for r in result["runs"]] == ["first", "second"]
    assert result["runs"][1]["commands"] == ["python benchmarks/speed.py run-of-d1"]
    md = into.with_suffix(".md").read_text()
    assert "| llada | fp8-scaled_mm-peer |" in md and "2.00" in md and "1.50" in md
