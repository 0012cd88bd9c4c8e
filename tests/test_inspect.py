"""``stq inspect``: the pass table agrees with the graphs it dumps; the backend's debug_dir gets the
same artifacts; bad model specs fail clearly."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from stq_compiler.__main__ import main
from stq_compiler.inspect import ArtifactWriter, format_table
from stq_compiler.recipe import Recipe, fingerprint_from_model
from tests.conftest import tiny_model

QLINEAR = "torch.ops.stq.quantized_linear.default"
QUANTIZER = "torch.ops.stq.quantize_per_token.default"
TAC = "torch.ops.stq.tac_block_affine.default"


def _export(path: Path) -> tuple[dict, list]:
    """Nodes by name and edges of a node-link JSON export."""
    data = json.loads(path.read_text())
    return {n["id"]: n for n in data["nodes"]}, [(e["source"], e["target"]) for e in data["edges"]]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _check_table_against_exports(out: Path, graph: str = "graph_0") -> list[dict]:
    """Every count of the table, recomputed from the graphs the run exported."""
    rows = json.loads((out / f"{graph}.passes.json").read_text())["passes"]
    exports = sorted((out / f"{graph}.exports").glob("*.json"))
    assert [p.stem for p in exports] == [f"{k:02d}_{'captured' if r['pass'] == 'capture' else r['pass']}" for k, r in enumerate(rows)]
    previous: dict = {}
    for row, path in zip(rows, exports):
        nodes, edges = _export(path)
        assert row["nodes"] == len(nodes), row["pass"]
        # Node names are unique within a graph and FX does not reuse an erased node's name.
        assert row["nodes_added"] == len(nodes.keys() - previous.keys()), row["pass"]
        assert row["nodes_removed"] == len(previous.keys() - nodes.keys()), row["pass"]
        assert row["nodes"] - (len(previous) if previous else 0) == row["nodes_added"] - row["nodes_removed"]
        previous = nodes
    final_nodes, final_edges = _export(exports[-1])
    targets = [n["target"] for n in final_nodes.values()]
    by_pass = {r["pass"]: r for r in rows}
    if "quantize_linears" in by_pass:
        q = by_pass["quantize_linears"]
        assert q["linears_quantized"] == targets.count(QLINEAR) > 0
        assert q["sites"] == targets.count(QUANTIZER)
        assert q["folded_bytes"] == q["details"]["constant_bytes"] > 0
        if "insert_token_state" in by_pass:
            state = by_pass["insert_token_state"]["details"]["state_node"]
            assert q["state_consumers"] == sum(1 for s, _ in final_edges if s == state) == q["sites"]
    if "insert_tac" in by_pass:
        t = by_pass["insert_tac"]
        assert t["tac_nodes"] == targets.count(TAC) > 0
        assert t["folded_bytes"] == t["details"]["parameter_bytes"]
    return rows


def test_inspect_default_model_prints_the_table_and_dumps_what_it_counts(tmp_path, capsys):
    assert main(["inspect", "--dump", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    rows = _check_table_against_exports(tmp_path)
    assert [r["pass"] for r in rows] == ["capture", "insert_token_state", "quantize_linears"]
    for row in rows:
        assert row["pass"] in stdout
    # the printed table is the table file (plain text when stdout is no terminal)
    assert (tmp_path / "graph_0.passes.txt").read_text() in stdout
    assert rows[-1]["linears_quantized"] == 14 and rows[-1]["sites"] == 8  # 2 layers; the head stays 16-bit
    graphs = sorted((tmp_path / "graph_0").iterdir())
    assert [p.name for p in graphs] == ["00_captured.py", "01_insert_token_state.py", "02_quantize_linears.py"]
    assert QLINEAR.removeprefix("torch.ops.") in graphs[-1].read_text()
    token_diff = (tmp_path / "graph_0.diffs" / "01_insert_token_state.diff").read_text()
    added = [l for l in token_diff.splitlines() if l.startswith("+") and not l.startswith("+++")]
    assert any("is_masked = torch.eq(l_input_ids_, 255)" in l for l in added)
    assert not (tmp_path / "graph_0.diffs" / "00_captured.diff").exists()  # nothing before the capture
    graphml = tmp_path / "graph_0.exports" / "02_quantize_linears.graphml"
    import networkx as nx

    assert nx.read_graphml(graphml).number_of_nodes() == rows[-1]["nodes"]


def _identity_recipe(model) -> Recipe:
    """A starquant recipe that changes nothing: identity rotations, all-open gates, identity TAC."""
    from stq_compiler.calibration.tac import TacParams

    tensors = {}
    for i in range(model.config.n_layers):
        block = f"model.transformer.blocks.{i}"
        for site, features in (("k_proj", 64), ("attn_out", 64), ("ff_proj", 64), ("ff_out", 128)):
            key = f"{block}.{site}.weight"
            tensors[Recipe.key(key, "site.p1")] = torch.eye(features // 8)
            tensors[Recipe.key(key, "site.p2")] = torch.eye(8)
            tensors[Recipe.key(key, "site.gate_masked")] = torch.ones(features)
            tensors[Recipe.key(key, "site.gate_unmasked")] = torch.ones(features)
        tac = TacParams.identity(64)
        tensors[Recipe.key(f"{block}.attn_out.weight", "tac.M")] = tac.M
        tensors[Recipe.key(f"{block}.attn_out.weight", "tac.d")] = tac.d
    return Recipe("starquant", 4, 4, 255, {}, tensors, fingerprint_from_model(model))


def test_inspect_with_a_recipe_runs_tac_and_reports_each_site(tmp_path, capsys):
    path = _identity_recipe(tiny_model("llada")).save(tmp_path / "identity.stq")
    out = tmp_path / "out"
    assert main(["inspect", "tiny-llada", "--recipe", str(path), "--sites", "--exports", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    rows = _check_table_against_exports(out)
    assert [r["pass"] for r in rows] == ["capture", "insert_token_state", "insert_tac", "quantize_linears"]
    assert rows[2]["tac_nodes"] == 2
    assert _files(out) == {f"graph_0.exports/{p}.{ext}" for p in ("00_captured", "01_insert_token_state", "02_insert_tac", "03_quantize_linears") for ext in ("graphml", "json")} | {"graph_0.passes.txt", "graph_0.passes.json"}
    site_lines = [l for l in stdout.splitlines() if l.startswith("site ")]
    assert len(site_lines) == 9
    assert sum("W4A4 starquant (rotation" in l for l in site_lines) == 8 and "role head  16-bit" in site_lines[-1]
    assert stdout.count("SGAT: site.gate_masked [64], site.gate_unmasked [64], site.p1 [8, 8], site.p2 [8, 8]") == 6
    assert stdout.count("TAC: model.transformer.blocks.0.attn_out.weight::tac.M [4, 16, 16]") == 1


def test_inspect_quantize_embedding_adds_its_pass(tmp_path, capsys):
    assert main(["inspect", "--quantize-embedding", "--exports", "--out", str(tmp_path)]) == 0
    rows = _check_table_against_exports(tmp_path)
    assert [r["pass"] for r in rows] == ["capture", "insert_token_state", "quantize_linears", "quantize_embedding"]
    last = rows[-1]
    assert last["nodes_added"] == 3 and last["nodes_removed"] == 1  # two buffer reads and the lookup; the float lookup
    assert last["folded_bytes"] == last["details"]["bytes_after"] == 256 * 64 + 4 * 256
    assert last["details"]["float_weight_unread"] is True


def test_inspect_kernels_writes_each_kernel_source(tmp_path, capsys):
    from stq_compiler.codegen.triton_rtn import kernel_sources

    assert main(["inspect", "--w-bits", "8", "--a-bits", "8", "--kernels", "--out", str(tmp_path)]) == 0
    for name, source in kernel_sources().items():
        assert (tmp_path / "kernels" / f"{name}.py").read_text() == source
    from stq_compiler.codegen import gluon_w4, triton_fused

    for name, source in triton_fused.kernel_sources().items():
        assert (tmp_path / "kernels" / "fused" / f"{name}.py").read_text() == source
    gluon_sources = gluon_w4.kernel_sources()
    if gluon_w4.gluon is not None:
        assert "warpgroup_mma(" in gluon_sources["_step"]
    for name, source in gluon_sources.items():
        assert (tmp_path / "kernels" / "fused" / f"{name}.py").read_text() == source
    assert not (tmp_path / "graph_0").exists()  # --kernels alone writes no graphs


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.a = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        h = torch.relu(self.a(self.emb(input_ids)))
        torch._dynamo.graph_break()
        return self.head(h)


def broken_model():
    torch.manual_seed(0)
    return Broken()


def test_module_function_spec_and_a_graph_break_give_a_table_per_graph(tmp_path, capsys):
    argv = ["inspect", "tests.test_inspect:broken_model", "--mask-token-id", "31", "--w-bits", "8", "--a-bits", "8", "--quantize-head"]
    assert main(argv + ["--dump", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("graph 0:") == stdout.count("graph 1:") == 1
    first, second = _check_table_against_exports(tmp_path, "graph_0"), _check_table_against_exports(tmp_path, "graph_1")
    assert [r["pass"] for r in first] == ["capture", "insert_token_state", "quantize_linears"]
    assert [r["pass"] for r in second] == ["capture", "quantize_linears"]  # no input_ids after the break
    assert first[-1]["linears_quantized"] == second[-1]["linears_quantized"] == 1


@pytest.mark.parametrize(
    "spec,match",
    [
        ("tiny-gpt2", "not a built-in model \\(tiny-llada, tiny-dream, tiny-llama, tiny-qwen2, stq-tiny-llada\\)"),
        ("no/such/dir", "an existing checkpoint directory, or module:function"),
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        ("stq_compiler.models:no_such_builder", "has no attribute 'no_such_builder'"),
        ("stq_compiler.models:tiny_llada_config", "returned a LLaDAConfig, not a torch.nn.Module"),
        ("EMPTY_DIR", "config.json"),
    ],
)
def test_bad_model_spec_fails_clearly(spec, match, tmp_path, capsys):
    if spec == "EMPTY_DIR":
        spec = str(tmp_path)
    assert main(["inspect", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stq inspect: error: model ")
    assert re.search(match, err), err


def test_bad_option_fails_clearly(capsys):
    assert main(["inspect", "--w-bits", "4", "--a-bits", "16"]) == 1
    assert "w_bits=4 with a_bits=16 is not supported" in capsys.readouterr().err


def test_python_dash_m_inspect_in_a_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "stq_compiler", "inspect", "tiny-dream", "--w-bits", "8", "--a-bits", "8", "--graphs", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "graph_0.passes.json").read_text())["passes"]
    assert [r["pass"] for r in rows] == ["capture", "insert_token_state", "quantize_linears"]
    assert format_table(rows).splitlines()[0] in proc.stdout  # the header row
    assert all(r["pass"] in proc.stdout for r in rows)
    assert sorted(p.name for p in (tmp_path / "graph_0").iterdir()) == ["00_captured.py", "01_insert_token_state.py", "02_quantize_linears.py"]
    script = Path(sys.executable).parent / "stq"  # the console script of pyproject's [project.scripts]
    assert script.exists()


def test_debug_dir_of_a_real_compile_gets_the_same_artifacts_as_inspect(tmp_path, capsys):
    model = tiny_model("llada")
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    ids[:, 8:] = model.config.mask_token_id  # inspect's example input has this shape and state pattern
    options = {"w_bits": 4, "a_bits": 4, "mask_token_id": 255, "debug_dir": str(tmp_path / "debug"), "inductor": False}
    with torch.no_grad():
        torch.compile(model, backend="starquant", options=options)(ids)
    assert main(["inspect", "tiny-llada", "--dump", "--out", str(tmp_path / "inspect")]) == 0
    debug, inspected = tmp_path / "debug", tmp_path / "inspect"
    assert _files(debug) == _files(inspected)
    assert {p.split("/")[0] for p in _files(debug)} == {"graph_0", "graph_0.diffs", "graph_0.exports", "graph_0.passes.txt", "graph_0.passes.json"}
    for name in _files(debug) - {"graph_0.passes.txt", "graph_0.passes.json"}:
        assert (debug / name).read_text() == (inspected / name).read_text(), name
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms", "details")} for r in rows]  # noqa: E731
    debug_rows = _check_table_against_exports(debug)
    assert strip(debug_rows) == strip(json.loads((inspected / "graph_0.passes.json").read_text())["passes"])


def test_writers_of_one_debug_dir_take_the_next_free_graph_index(tmp_path):
    names = [ArtifactWriter(tmp_path).name for _ in range(3)]
    assert names == ["graph_0", "graph_1", "graph_2"]
    assert ArtifactWriter(tmp_path, index=1).name == "graph_1"  # inspect: an explicit index replaces
    assert not ArtifactWriter(None).enabled


def test_inspect_the_bundled_model_with_its_recipe_and_the_fusion_pass(capsys):
    from stq_compiler.__main__ import main
    from stq_compiler.models.bundled import recipe_path

    assert main(["inspect", "stq-tiny-llada", "--recipe", str(recipe_path("stq-tiny-llada", "starquant-w4a4")), "--fuse"]) in (0, None)
    table = capsys.readouterr().out
    for name in ("insert_token_state", "insert_tac", "quantize_linears", "fuse_quantized_sites"):
        assert name in table
