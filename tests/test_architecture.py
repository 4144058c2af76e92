"""The layering of ARCHITECTURE.md, checked on the import graph.

Every ``import`` in ``qgraph/``, ``passes/`` and ``backends/`` (module level or inside a
function: a lazy import hides an edge, it does not remove it) becomes an edge of a networkx
``DiGraph`` between modules. The test fails on an edge that runs up a layer, on an edge
between layers that must not know each other, and on any cycle, printing the offending
chain. Imports under ``if TYPE_CHECKING:`` are for type checkers only and are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"qgraph.passes": ROOT / "passes", "qgraph.backends": ROOT / "backends", "qgraph.models": ROOT / "models", "qgraph": ROOT / "qgraph"}

# (module prefix, layer); the longest matching prefix wins. A module may import its own
# layer and the layers below it.
LAYERS: tuple[tuple[str, int], ...] = (
    ("qgraph.models", 0),
    ("qgraph.core", 1),
    ("qgraph.quant", 2),
    ("qgraph.ops", 3),
    ("qgraph.observers", 4),
    ("qgraph.passes", 5),
    ("qgraph.backends", 5),
    ("qgraph.api", 6),
    ("qgraph.recipes", 7),
    ("qgraph.tools", 8),
    ("qgraph.llm", 8),
    ("qgraph.cli", 9),
    ("qgraph.demo", 9),
    ("qgraph.model_spec", 9),
    ("qgraph.__main__", 9),
    ("qgraph", 8),  # the public facade, qgraph/__init__.py: only its users (llm scripts, cli) import it
)
LAYER_NAMES = {0: "models", 1: "core", 2: "quant", 3: "ops", 4: "observers", 5: "passes / backends", 6: "api", 7: "recipes", 8: "tools / llm", 9: "cli"}
APART = (("qgraph.passes", "qgraph.backends"), ("qgraph.backends", "qgraph.passes"), ("qgraph.tools", "qgraph.llm"), ("qgraph.llm", "qgraph.tools"))
"""Pairs of one layer that must not import each other: a pass never names a backend, a
backend's rules and emitters need no pass; tools and the LLM scripts are separate users."""


def module_files() -> dict[str, Path]:
    files = {}
    for prefix, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "qgraph" and parts and parts[0] in ("passes", "backends", "models"):
                continue
            files.setdefault(name, path)
    return files


def layer_of(module: str) -> tuple[str, int]:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return best, dict(LAYERS)[best]


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def import_graph() -> nx.DiGraph:
    """Modules as nodes; an edge per import, with the line it is on and the names it takes."""
    files = module_files()
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_lines(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[tuple[str, list[str]]] = []
            if isinstance(node, ast.Import):
                targets = [(a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append((sub, []) if sub in files else (base, [alias.name]))
            for target, names in targets:
                if target == "qgraph" or target.startswith("qgraph."):
                    while target not in files and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target != module:
                        data = graph.get_edge_data(module, target, {"line": node.lineno, "names": []})
                        graph.add_edge(module, target, line=data["line"], names=data["names"] + names)
    return graph


def is_pass_module(path: Path) -> bool:
    """A pass module defines the class its file is named after (``fuse_conv_bn.py``: ``FuseConvBn``);
    other modules under ``passes/`` hold what several passes share (matchers, records, tables)."""
    wanted = path.stem.replace("_", "").lower()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name.lower() == wanted:
            names = {t.id for s in node.body if isinstance(s, ast.Assign) for t in s.targets if isinstance(t, ast.Name)}
            if "name" in names:  # a pass names itself (the dump file name)
                return True
    return False


def _requires_names(path: Path) -> set[str]:
    """Names a pass module lists in a ``requires = (...)`` class attribute, or derives a class from."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            names |= {b.id for b in node.bases if isinstance(b, ast.Name)}
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "requires" for t in targets) and node.value is not None:
                names |= {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
    return names


def layer_violations(graph: nx.DiGraph) -> list[str]:
    files = module_files()
    out = []
    for src, dst, data in graph.edges(data=True):
        (src_layer, src_rank), (dst_layer, dst_rank) = layer_of(src), layer_of(dst)
        where = f"{files[src].relative_to(ROOT)}:{data['line']}"
        if src_layer == "qgraph.models":
            out.append(f"{where}: {src} imports {dst}; models/ imports no qgraph module")
        elif dst == "qgraph" and src_rank < 8 or dst == "qgraph" and src_layer == "qgraph.tools":
            out.append(f"{where}: {src} imports the public facade `qgraph`; import the home module of the name instead")
        elif dst_rank > src_rank:
            out.append(f"{where}: {src} ({LAYER_NAMES[src_rank]}) imports {dst} ({LAYER_NAMES[dst_rank]}), a higher layer")
        elif (src_layer, dst_layer) in APART:
            out.append(f"{where}: {src} imports {dst}; {src_layer} and {dst_layer} must not import each other")
        elif src_layer == dst_layer == "qgraph.passes" and is_pass_module(files[src]) and is_pass_module(files[dst]):
            wanted = set(data["names"])
            named = _requires_names(files[src])
            if not wanted or not wanted <= named:
                out.append(f"{where}: pass module {src} imports {sorted(wanted) or dst} from pass module {dst}; "
                           "a pass imports another pass only to name it in `requires` (move shared code below the passes)")
    return out


def test_no_import_runs_up_a_layer():
    violations = layer_violations(import_graph())
    assert not violations, "imports against ARCHITECTURE.md's layers:\n" + "\n".join(violations)


def test_import_graph_has_no_cycle():
    graph = import_graph()
    cycles = list(nx.simple_cycles(graph))
    chains = [" -> ".join([*c, c[0]]) for c in sorted(cycles, key=len)[:10]]
    assert not cycles, f"{len(cycles)} import cycle(s), shortest first:\n" + "\n".join(chains)


def test_the_checker_sees_a_wrong_import(tmp_path, monkeypatch):
    """The layer check fails on an upward import and on a cycle (so the two tests above can fail)."""
    graph = import_graph()
    graph.add_edge("qgraph.core.graph", "qgraph.passes.prepare.annotate", line=1, names=[])
    assert any("qgraph.core.graph (core) imports qgraph.passes.prepare.annotate" in v for v in layer_violations(graph))
    graph.add_edge("qgraph.passes.prepare.annotate", "qgraph.core.graph", line=1, names=[])
    assert list(nx.simple_cycles(graph))


@pytest.mark.parametrize("module", ["qgraph.core", "qgraph.core.graph", "qgraph.core.pass_manager", "qgraph.core.dump"])
def test_core_loads_no_runtime_or_plotting_package(module):
    code = (
        f"import sys, {module}\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'onnx', 'onnxruntime', 'executorch', 'matplotlib', 'torchao'})\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import {module} loaded {out}"
