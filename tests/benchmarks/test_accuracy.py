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
