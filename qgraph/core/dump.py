"""Readable dumps of a graph after every pass: ``NNN_<pass>.txt``, ``NNN_<pass>.diff``, index.

One line per node::

    %conv2d = aten.conv2d.default(%x, %w, None, [1, 1]) :: f32[s0, 16, 8, 8]  | out int8[-128,127] affine PerTensor  <- conv_relu @ features.0

After the annotate pass the line carries the output spec and, per input, the spec of that
edge; after insert_quantizers the observer / fake-quant modules show their spec and range.
The diff is a unified diff against the previous dump; ``index.txt`` lists the passes with
their ``modified`` flag, time and node count. ``NNN_<pass>.json`` holds the same graph as
data (nodes with kind, specs, module and stack trace; edges) for the HTML report.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch
import torch.fx

from qgraph.core.files import atomic_write_text
from qgraph.core.graph import module_path
from qgraph.core.meta import ANNOTATION_KEY, REFUSALS_KEY
from qgraph.quant.specs import QuantSpec, SharedSpec

if TYPE_CHECKING:
    from qgraph.core.pass_manager import PassRecord


def _fmt_arg(a) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, float):
        return f"{a:.6g}"
    return str(a).replace("torch.", "")


def _fmt_val(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dt = str(val.dtype).replace("torch.", "").replace("float32", "f32")
        return f"{dt}{list(val.shape)}".replace("'", "")
    return ""


def _fmt_spec(spec) -> str:
    if isinstance(spec, QuantSpec):
        return spec.short()
    if isinstance(spec, SharedSpec):
        return f"shared with {spec.point}"
    return type(spec).__name__ if spec is not None else "float"


def format_node(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    target = str(node.target)
    args = ", ".join([_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()])
    line = f"%{node.name} = {node.op}[{target}]({args})"
    val = _fmt_val(node)
    if val:
        line += f" :: {val}"
    notes = []
    if node.op == "call_module":
        notes.append(repr(gm.get_submodule(str(node.target))).replace("\n", " "))
    ann = node.meta.get(ANNOTATION_KEY)
    if ann is not None:
        if ann.output is not None:
            notes.append(f"out {_fmt_spec(ann.output)}")
        for inp, spec in ann.inputs.items():
            notes.append(f"in %{inp}: {_fmt_spec(spec)}")
        notes.append(f"<- {ann.rule}")
    if node.meta.get(REFUSALS_KEY):
        notes.append("float: " + "; ".join(map(str, node.meta[REFUSALS_KEY])))
    mod = module_path(node)
    if mod:
        notes.append(f"@ {mod}")
    if notes:
        line += "  | " + "; ".join(notes)
    return line


def node_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """``input``, ``constant``, ``output``, ``quantizer`` (observer / fake-quant),
    ``quantize``, ``dequantize`` or ``op`` — what a viewer colours a node by."""
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "constant"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        from qgraph.observers.base import QUANTIZER_TYPES

        return "quantizer" if isinstance(gm.get_submodule(str(node.target)), QUANTIZER_TYPES) else "module"
    name = str(node.target)
    if "quantized_decomposed.quantize" in name:
        return "quantize"
    if "quantized_decomposed.dequantize" in name:
        return "dequantize"
    return "op"


def graph_record(gm: torch.fx.GraphModule) -> dict:
    """The graph as plain data for viewers: nodes with spec, provenance and kind; edges."""
    nodes, edges = [], []
    for node in gm.graph.nodes:
        ann = node.meta.get(ANNOTATION_KEY)
        record = {
            "name": node.name,
            "op": node.op,
            "target": str(node.target),
            "kind": node_kind(gm, node),
            "value": _fmt_val(node),
            "line": format_node(gm, node),
            "module": module_path(node),
            "module_type": _module_type(node),
            "stack_trace": (node.meta.get("stack_trace") or "").strip(),
            "rule": ann.rule if ann is not None else None,
            "output_spec": _fmt_spec(ann.output) if ann is not None and ann.output is not None else None,
            "input_specs": {k: _fmt_spec(v) for k, v in ann.inputs.items()} if ann is not None else {},
        }
        if node.op == "call_module":
            record["quantizer"] = repr(gm.get_submodule(str(node.target))).replace("\n", " ")
        nodes.append(record)
        edges.extend([src.name, node.name] for src in node.all_input_nodes)
    return {"nodes": nodes, "edges": edges}


def _module_type(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    cls = list(stack.values())[-1][1]
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def format_graph(gm: torch.fx.GraphModule) -> str:
    """The whole graph, one :func:`format_node` line per node."""
    return "\n".join(format_node(gm, n) for n in gm.graph.nodes) + "\n"


class GraphDumper:
    """Writes the dumps of one pipeline run into ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._previous: str | None = None
        self._previous_name = ""

    def write(self, index: int, name: str, gm: torch.fx.GraphModule, modified: bool) -> None:
        text = format_graph(gm)
        stem = f"{index:03d}_{name}"
        atomic_write_text(self.directory / f"{stem}.txt", text)
        record = {"index": index, "pass": name, "modified": modified, **graph_record(gm)}
        atomic_write_text(self.directory / f"{stem}.json", json.dumps(record))
        if self._previous is not None:
            diff = difflib.unified_diff(
                self._previous.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=self._previous_name,
                tofile=f"{stem}.txt",
                n=1,
            )
            atomic_write_text(self.directory / f"{stem}.diff", "".join(diff))
        self._previous, self._previous_name = text, f"{stem}.txt"

    def write_index(self, records: Iterable["PassRecord"]) -> None:
        lines = ["pass                      modified  seconds  nodes"]
        for i, r in enumerate(records, start=1):
            lines.append(f"{i:03d}_{r.name:<21} {str(r.modified):<9} {r.seconds:7.3f}  {r.nodes}")
        atomic_write_text(self.directory / "index.txt", "\n".join(lines) + "\n")
