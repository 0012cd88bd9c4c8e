"""Inspecting the passes: the pass table, the per-site report, and the artifacts of each pass.

One ``ArtifactWriter`` serves ``stq inspect --dump`` and the backend's ``debug_dir`` (both through
``pipeline.run_passes``), so the two leave the same files. For graph ``n`` of a run:

    graph_<n>/<k>_<pass>.py           the readable graph after pass k (00_captured first)
    graph_<n>.diffs/<k>_<pass>.diff   unified diff of that graph against pass k-1's
    graph_<n>.exports/<k>_<pass>.*    networkx exports: .graphml, .json (node-link); .dot where pydot is installed
    graph_<n>.passes.txt / .json      the pass table (rewritten after each pass)

The table has one row per pass that ran. ``nodes_added`` / ``nodes_removed`` / ``folded_bytes``
(bytes of the buffers the pass registered) and ``seconds`` are measured by the pipeline around
each pass; the other columns are what the pass reported.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable, Optional, TextIO

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name  # what FX itself prints for a target

ARTIFACTS = ("graphs", "diffs", "exports", "table")

# (column title, row key): the pass table's columns, in order.
COLUMNS = (
    ("pass", "pass"),
    ("nodes", "nodes"),
    ("added", "nodes_added"),
    ("removed", "nodes_removed"),
    ("linears q.", "linears_quantized"),  # linears quantized
    ("sites", "sites"),  # capture: sites found; quantize_linears: sites quantized
    ("state use", "state_consumers"),  # nodes that read the token state
    ("TAC", "tac_nodes"),
    ("folded B", "folded_bytes"),  # bytes of the constants (buffers) the pass folded in
    ("ms", "ms"),
)


# ----------------------------------------------------------------------------------------------
# The pass table


def pass_row(report) -> dict:
    """One table row from a ``PassReport``; ``None`` where the pass does not report that count."""
    d = report.details
    return {
        "pass": report.name,
        "nodes": report.nodes_after,
        "nodes_added": d.get("nodes_added"),
        "nodes_removed": d.get("nodes_removed"),
        "linears_quantized": d.get("linears_quantized"),
        "sites": d.get("sites"),
        "state_consumers": d.get("state_consumers"),
        "tac_nodes": d.get("tac_nodes"),
        "folded_bytes": d.get("folded_bytes"),
        "ms": round(d["seconds"] * 1e3, 3) if "seconds" in d else None,
    }


def _cells(row: dict) -> list[str]:
    """A row's cells as text: ``-`` for counts a pass does not report."""
    return ["-" if row[key] is None else f"{row[key]:.1f}" if key == "ms" else str(row[key]) for _, key in COLUMNS]


def format_table(rows: list[dict]) -> str:
    """The rows as plain aligned text."""
    cells = [[title for title, _ in COLUMNS]] + [_cells(row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], title: str = "", file: Optional[TextIO] = None) -> None:
    """Print the table: with ``rich`` on a terminal where it is installed, else plain text."""
    file = file or sys.stdout
    if file.isatty():
        try:
            from rich import box
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(title=title or None, box=box.SIMPLE_HEAD)
            for i, (name, _) in enumerate(COLUMNS):
                table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
            for row in rows:
                table.add_row(*_cells(row))
            # Never squeeze (rich would cut numbers): a narrow terminal wraps it, as it does plain text.
            console = Console(file=file)
            console.width = max(console.width, len(format_table(rows).splitlines()[0]) + 2 * len(COLUMNS))
            console.print(table)
            return
    if title:
        print(title, file=file)
    print(format_table(rows), end="", file=file)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def table_json(rows: list[dict], reports, title: str = "") -> dict:
    return {"title": title, "passes": [{**row, "details": _jsonable(r.details)} for row, r in zip(rows, reports)]}


# ----------------------------------------------------------------------------------------------
# Readable graphs, diffs and graph exports


def readable(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False)


def graph_diff(before: str, after: str, before_name: str, after_name: str) -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), before_name, after_name))


def target_name(node: fx.Node) -> str:
    """``torch.eq``, ``torch.ops.stq.quantized_linear.default``, ``view`` (a method), ``stq_..._q`` (get_attr)."""
    if isinstance(node.target, str):
        return node.target
    try:
        return _get_qualified_name(node.target)
    except (AttributeError, RuntimeError, TypeError):  # a callable without a findable home
        return str(node.target)


def _node_attributes(index: int, node: fx.Node) -> dict:
    """Scalars only (GraphML holds no lists or None): op, target, shape, dtype, our metadata."""
    attrs = {"index": index, "op": node.op, "target": target_name(node)}
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, torch.Tensor):
        attrs["shape"] = str(list(value.shape))
        attrs["dtype"] = str(value.dtype).replace("torch.", "")
    for key in ("stq_linear", "stq_tac"):
        for k, v in (node.meta.get(key) or {}).items():
            attrs[f"{key}.{k}"] = str(v)
    return attrs


def to_networkx(gm: fx.GraphModule):
    """A ``networkx.DiGraph``: one vertex per FX node (by name), an edge from each input to its user."""
    import networkx as nx

    graph = nx.DiGraph()
    for i, node in enumerate(gm.graph.nodes):
        graph.add_node(node.name, **_node_attributes(i, node))
    for node in gm.graph.nodes:
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def export_graph(gm: fx.GraphModule, stem: Path) -> list[Path]:
    """Write ``stem.graphml``, ``stem.json`` (node-link) and, where pydot is installed, ``stem.dot``."""
    import networkx as nx

    graph = to_networkx(gm)
    paths = [stem.with_suffix(".graphml"), stem.with_suffix(".json")]
    nx.write_graphml(graph, paths[0])
    try:
        data = nx.node_link_data(graph, edges="edges")
    except TypeError:  # networkx < 3.4
        data = nx.node_link_data(graph, link="edges")
    paths[1].write_text(json.dumps(data, indent=1))
    try:
        import pydot  # noqa: F401
    except ImportError:
        return paths
    dot = to_networkx(gm)
    for _, attrs in dot.nodes(data=True):  # DOT reads ':' and '[' in bare values as syntax
        for k in list(attrs):
            attrs[k] = json.dumps(str(attrs[k]))
    paths.append(stem.with_suffix(".dot"))
    nx.nx_pydot.write_dot(dot, paths[-1])
    return paths


# ----------------------------------------------------------------------------------------------
# The artifact writer


class ArtifactWriter:
    """Writes the artifacts of one graph's passes under ``root`` (see the module docstring).

    ``root=None`` writes nothing. ``index=None`` takes the next free ``graph_<n>`` (the backend:
    one writer per captured graph, runs accumulate); an explicit index replaces that graph's files.
    ``kinds``: which of ``ARTIFACTS`` to write.
    """

    def __init__(self, root=None, kinds: Iterable[str] = ARTIFACTS, index: Optional[int] = None):
        self.kinds = set(kinds)
        unknown = self.kinds - set(ARTIFACTS)
        if unknown:
            raise ValueError(f"unknown artifact kind(s) {sorted(unknown)}; choose from {ARTIFACTS}")
        self.root = Path(root) if root is not None and self.kinds else None
        self.index = index
        self.step = 0
        self._previous: Optional[tuple[str, str]] = None  # (file name, readable text) of the last pass
        self.rows: list[dict] = []
        if self.root is not None:
            self._claim_index()

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _claim_index(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.index is not None:
            for path in self.paths():
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            self.graph_dir.mkdir()
            return
        taken = [int(m.group(1)) for p in self.root.iterdir() if (m := re.fullmatch(r"graph_(\d+)", p.name))]
        self.index = max(taken, default=-1) + 1
        while True:  # another process may take the same index between listing and mkdir
            try:
                self.graph_dir.mkdir()
                return
            except FileExistsError:
                self.index += 1

    @property
    def name(self) -> str:
        return f"graph_{self.index}"

    @property
    def graph_dir(self) -> Path:
        return self.root / self.name

    def paths(self) -> list[Path]:
        """Where this graph's artifacts go (whether or not written yet)."""
        base = self.root / self.name
        return [base, Path(f"{base}.diffs"), Path(f"{base}.exports"), Path(f"{base}.passes.txt"), Path(f"{base}.passes.json")]

    def after_pass(self, gm: fx.GraphModule, reports: list, header: str = "") -> None:
        """Record the graph as the last of ``reports`` left it."""
        if self.root is None:
            return
        report = reports[-1]
        stem = f"{self.step:02d}_{'captured' if report.name == 'capture' else report.name}"
        graph_dir, diff_dir, export_dir, table_txt, table_json_path = self.paths()
        if self.kinds & {"graphs", "diffs"}:
            text = readable(gm)
            if "graphs" in self.kinds:
                (graph_dir / f"{stem}.py").write_text(header + text)
            if "diffs" in self.kinds and self._previous is not None:
                diff_dir.mkdir(exist_ok=True)
                before_name, before = self._previous
                (diff_dir / f"{stem}.diff").write_text(graph_diff(before, text, before_name, f"{stem}.py"))
            self._previous = (f"{stem}.py", text)
        if "exports" in self.kinds:
            export_dir.mkdir(exist_ok=True)
            export_graph(gm, export_dir / stem)
        if "table" in self.kinds:
            rows = [pass_row(r) for r in reports]
            table_txt.write_text(format_table(rows))
            table_json_path.write_text(json.dumps(table_json(rows, reports, self.name), indent=1) + "\n")
        self.step += 1


# ----------------------------------------------------------------------------------------------
# The per-site report


def _shape(tensor) -> list[int]:
    return list(tensor.shape)


def _tensor_sizes(tensors: dict) -> tuple[str, int]:
    text = ", ".join(f"{k} {_shape(t)}" for k, t in tensors.items())
    return text, sum(t.numel() * t.element_size() for t in tensors.values())


def site_report(result, opts) -> list[dict]:
    """Per site of ``result.analysis``: linears and shapes, role, method, bits and the recipe's
    tensors for the site (``site.*``: smoothing / SGAT rotation and gates) and its linears
    (``tac.*``, ``w.*``)."""
    from stq_compiler.passes.quantize_linears import eligible, site_key

    recipe = opts.recipe
    rows = []
    for site in result.analysis.sites:
        key = site_key(site)
        transform = result.plan.transforms.get(key)
        quantized = [lin for lin in site.linears if opts.quantize and eligible(lin, opts.quantize_head)]
        if not quantized:
            method, bits = "not quantized", "16-bit"
        else:
            method = recipe.method if transform is not None else "rtn"
            bits = f"W{opts.w_bits}A{opts.a_bits}"
        parts = []
        if transform is not None:
            parts += ["fold_norm"] if transform.fold_norm else []
            parts += ["smooth"] if transform.smooth is not None else []
            if transform.has_rotation:
                parts.append(f"rotation {transform.p1.shape[0]}x{transform.p2.shape[0]}")
            parts += ["state gates"] if transform.has_gates else []
        value = site.input.meta.get("example_value")
        row = {
            "site": site.name,
            "key": key,
            "role": site.role,
            "input": _shape(value) if isinstance(value, torch.Tensor) else None,
            "method": method,
            "bits": bits,
            "transform": parts,
            "linears": [
                {"fqn": lin.fqn, "shape": [lin.out_features, lin.in_features], "quantized": lin in quantized}
                for lin in site.linears
            ],
            "sgat": {},
            "tac": {},
        }
        if recipe is not None:
            row["sgat"] = {k: t for k, t in recipe.for_parameter(key).items() if k.startswith("site.")}
            for lin in site.linears:
                row["tac"].update({f"{lin.fqn}::{k}": t for k, t in recipe.for_parameter(lin.fqn).items() if k.startswith("tac.")})
        rows.append(row)
    return rows


def format_sites(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        transform = f" ({', '.join(row['transform'])})" if row["transform"] else ""
        lines.append(
            f"site {row['site']}  role {row['role']}  {row['bits']} {row['method']}{transform}  input {row['input']}"
        )
        width = max(len(lin["fqn"]) for lin in row["linears"])
        for lin in row["linears"]:
            kept = "" if lin["quantized"] else "  (16-bit)"
            lines.append(f"    {lin['fqn'].ljust(width)}  [{lin['shape'][0]}, {lin['shape'][1]}]{kept}")
        labels = {"sgat": "SGAT" if row["method"] == "starquant" else "transform", "tac": "TAC"}
        for key, label in labels.items():
            if row[key]:
                text, nbytes = _tensor_sizes(row[key])
                lines.append(f"    {label}: {text}  ({nbytes} bytes)")
    return "\n".join(lines) + "\n"
