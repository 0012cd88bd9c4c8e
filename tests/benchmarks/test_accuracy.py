"""benchmarks/accuracy.py end to end on a tiny slice (its --tiny mode), on the CPU."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy.py"


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_one_record_per_method_setting_corpus_metric(accuracy, tmp_path):
    out = tmp_path / "accuracy.json"
    accuracy.main(["--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    records = result["records"]
    keys = [(r["method"], r["setting"], r["corpus"], r["metric"]) for r in records]
    assert len(keys) == len(set(keys))
    for corpus in ("kjv", "wiki"):
        assert ("float32", "W16A16", corpus, "ppl@0.5") in keys
        for method in ("rtn", "starquant"):
            for metric in ("ppl@0.5", "agreement", "hidden_error_last", "hidden_error_curve"):
                assert (method, "W4A4", corpus, metric) in keys
    curve = next(r["value"] for r in records if r["metric"] == "hidden_error_curve")
    assert len(curve) == result["settings"]["steps"]
    assert all(r["value"] > 1 for r in records if r["metric"].startswith("ppl"))
    assert set(result["gap_closed_ppl@0.5_W4A4"]) == {"kjv", "wiki"}
    assert "| starquant | W4A4 |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "accuracy-hidden-error.png").stat().st_size > 1000


def _run(tmp_path, name, methods, *, float_ppl=28.6, windows=256):
    """A results file as accuracy.py writes it: the float reference and ``methods`` ({name: ppl}) at W4A4."""
    settings = {"model": "m", "methods": ["float16", *methods], "settings": ["W4A4"], "corpora": ["kjv"],
                "windows": windows, "steps": 2, "seed": 0, "tiny": False}
    header = {"model": "m", "device": "gpu", "dtype": "float16", "torch": "2.x", "settings": settings,
              "unigram_ppl": {"kjv": 400.0}, "date": "2026-11-29"}
    records = [] if float_ppl is None else [
        {"method": "float16", "setting": "W16A16", "corpus": "kjv", "metric": "ppl@0.5", "value": float_ppl}]
    for method, ppl in methods.items():
        records += [{"method": method, "setting": "W4A4", "corpus": "kjv", "metric": "ppl@0.5", "value": ppl},
                    {"method": method, "setting": "W4A4", "corpus": "kjv", "metric": "hidden_error_curve", "value": [0.1, ppl / 100]}]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**header, "records": records}))
    return path


def test_merge_joins_runs_of_one_protocol_into_one_table(accuracy, tmp_path):
    a = _run(tmp_path, "a", {"rtn": 46.0, "quarot": 33.5})
    b = _run(tmp_path, "b", {"starquant+gptq": 31.9})
    out = tmp_path / "merged" / "accuracy.json"
    accuracy.main(["--merge", str(a), str(b), "--out", str(out)])
    result = json.loads(out.read_text())
    keys = [(r["method"], r["setting"], r["metric"]) for r in result["records"]]
    assert len(keys) == len(set(keys))
    assert {m for m, s, _ in keys if s == "W4A4"} == {"rtn", "quarot", "starquant+gptq"}
    assert keys.count(("float16", "W16A16", "ppl@0.5")) == 1
    assert result["settings"]["methods"] == ["float16", "rtn", "quarot", "starquant+gptq"]
    assert [f["measured"] for f in result["merged_from"]] == [["quarot W4A4", "rtn W4A4"], ["starquant+gptq W4A4"]]
    gap = 46.0 - 28.6
    assert result["gap_closed_ppl@0.5_W4A4"]["kjv"]["starquant+gptq"] == pytest.approx((46.0 - 31.9) / gap)
    table = out.with_suffix(".md").read_text()
    assert "| quarot | W4A4 | 33.50 |" in table and "| starquant+gptq | W4A4 | 31.90 |" in table
    assert (out.parent / "accuracy-hidden-error.png").stat().st_size > 1000


@pytest.mark.parametrize("change, message", [
    (dict(methods={"rtn": 45.0}), "rtn W4A4 was measured by both"),
    (dict(methods={"quarot": 33.5}, float_ppl=28.7), "float reference"),
    (dict(methods={"quarot": 33.5}, windows=64), "settings.windows"),
    (dict(methods={"quarot": 33.5}, float_ppl=None), "float reference .* missing"),
])
def test_merge_refuses_runs_that_do_not_belong_in_one_table(accuracy, tmp_path, change, message):
    a = _run(tmp_path, "a", {"rtn": 46.0})
    b = _run(tmp_path, "b", **change)
    out = tmp_path / "merged.json"
    with pytest.raises(SystemExit, match=message):
        accuracy.main(["--merge", str(a), str(b), "--out", str(out)])
    assert not out.exists()
