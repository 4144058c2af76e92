"""Dumps of a graph after every pass: text for people, JSON for tools.

In each stage folder (``prepare_qat/``, ``convert/``, ...) the :class:`GraphDumper` writes

* ``NNN_<pass>.txt`` — one line per node (wrapped here)::

      %conv2d = call_function[aten.conv2d.default](%x, %w, None, [1, 1]) :: f32[2, 16, 8, 8]
          | in %x: int8[-128,127] affine PerTensor; in %w: ...; <- conv_relu; @ features.0

* ``NNN_<pass>.diff`` — the unified diff of that listing against the previous pass;
* ``NNN_<pass>.json`` — the same graph as data (:data:`~qgraph.core.dump_format.PASS_SCHEMA`):
  every node and every edge with the dtype it carries, its quant range ``quant_min`` / ``quant_max``, the spec summary
  (``scheme`` symmetric / affine, ``granularity``, ``bits``, ``dynamic``), the backend
  ``rule`` that put it there and its qparams ``group``; a viewer reads fields, never text;
* ``index.txt`` / ``index.json`` — the passes with their ``modified`` flag, seconds and node
  count.

Self-description
----------------
Core knows no spec, annotation or quantizer type (they live in higher layers). Those
objects describe themselves through one method, found by duck typing::

    dump_fields() -> dict      # JSON-able

* a **spec** returns ``"text"`` (its one-line form) and either ``"shares": point`` (its
  qparams are those of another point) or the concrete fields ``"dtype"``, ``"quant_min"``,
  ``"quant_max"`` (and whatever summary it has: ``"bits"``, ``"scheme"``, ``"granularity"``,
  ``"axis"``, ``"group_size"``, ``"dynamic"``, ...);
* the **annotation** in ``node.meta[ANNOTATION_KEY]`` returns ``"rule"``, ``"anchor"``,
  ``"inputs"`` (producer name -> spec fields) and ``"output"`` (spec fields or None);
* a **quantizer module** (observer, fake-quant) returns ``"kind": "quantizer"``, ``"class"``,
  ``"point"``, ``"spec"`` (spec fields) and ``"text"``.

A *point* is a node name (that node's output) or an edge ``[producer, consumer]``.

Dtype and group of an edge ``src -> dst``
-----------------------------------------
The first of these that applies:

0. ``dst`` is a quantizer module or a quantize op: the edge carries the float value that
   ``dst`` quantizes (rule 5);
1. ``dst``'s annotation puts a spec on its input ``src``: that spec, followed through
   ``"shares"`` to the concrete spec it names; the group is the point where the chain ends
   (``x->conv2d``, ``relu``), so the inputs of a cat, which share the cat's qparams, have one
   group;
2. ``src`` calls a quantizer module: its spec; the group is the module's name (one module
   per group of points after ``insert_quantizers``);
3. ``src`` is a quantize op, or ``dst`` a dequantize op reading ``src``: the op's
   ``quant_min``, ``quant_max`` and ``dtype`` arguments (read by the op schema's argument
   names);
4. ``src``'s annotation puts a spec on its output: as in 1;
5. otherwise the edge is not quantized: the dtype of ``src``'s value, no range, no group.

A node's own quant fields are those of its output (2, 3 for quantize ops, 4).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol, runtime_checkable

import torch
import torch.fx

from qgraph.core.dump_format import INDEX_JSON, INDEX_SCHEMA, INDEX_TEXT, PASS_SCHEMA, pass_stem
from qgraph.core.files import atomic_write_text
from qgraph.core.graph import is_op, module_path
from qgraph.core.meta import ANNOTATION_KEY, REFUSALS_KEY
from qgraph.core.opsets import DEQUANTIZE_OPS, DYNAMIC_DEQUANTIZE_OPS, DYNAMIC_QUANTIZE_OPS, QUANTIZE_OPS

if TYPE_CHECKING:
    from qgraph.core.pass_manager import PassRecord

_QUANTIZE = QUANTIZE_OPS | DYNAMIC_QUANTIZE_OPS
_DEQUANTIZE = DEQUANTIZE_OPS | DYNAMIC_DEQUANTIZE_OPS


@runtime_checkable
class Describes(Protocol):
    """What specs, annotations and quantizer modules implement to appear in the dumps."""

    def dump_fields(self) -> dict: ...


def describe(obj: object) -> dict | None:
    """``obj.dump_fields()``, or None when ``obj`` does not describe itself."""
    return obj.dump_fields() if isinstance(obj, Describes) else None


def point_id(point: str | list | tuple) -> str:
    """A point as a group name: ``relu`` for a node's output, ``x->conv2d`` for an edge."""
    return point if isinstance(point, str) else f"{point[0]}->{point[1]}"


# ---------------------------------------------------------------------------- text


def _fmt_arg(a) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, float):
        return f"{a:.6g}"
    return str(a).replace("torch.", "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fmt_val(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dt = _dtype_name(val.dtype).replace("float32", "f32")
        return f"{dt}{list(val.shape)}".replace("'", "")
    return ""


def _shape(val: object) -> list[int | str] | None:
    """A tensor value's shape; a symbolic size (``s0``) as its text."""
    if not isinstance(val, torch.Tensor):
        return None
    return [d if isinstance(d, int) else str(d) for d in val.shape]


def _spec_text(fields: dict | None) -> str:
    return "float" if fields is None else str(fields.get("text") or fields.get("type") or "spec")


def _module_type(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    cls = list(stack.values())[-1][1]
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------- the graph as data


class DescribedGraph:
    """One graph with every annotation and quantizer module described once.

    :meth:`resolve` follows ``"shares"`` chains with memoization, so describing all nodes
    and edges is linear in the graph.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.annotations: dict[str, dict] = {}
        self.modules: dict[str, dict | None] = {}
        for node in gm.graph.nodes:
            fields = describe(node.meta.get(ANNOTATION_KEY))
            if fields is not None:
                self.annotations[node.name] = fields
            if node.op == "call_module":
                self.modules[node.name] = describe(gm.get_submodule(str(node.target)))
        self._resolved: dict[str, tuple[dict | None, str | None]] = {}

    def spec_at(self, point: str | list | tuple) -> dict | None:
        """The spec fields a rule put at ``point`` (as written: maybe ``"shares"``)."""
        if isinstance(point, str):
            return (self.annotations.get(point) or {}).get("output")
        producer, consumer = point
        return (self.annotations.get(consumer) or {}).get("inputs", {}).get(producer)

    def resolve(self, point: str | list | tuple) -> tuple[dict | None, str | None]:
        """``(concrete spec fields, group)`` at ``point``: the ``"shares"`` chain is followed
        to its end, whose point names the group. ``(None, None)`` when the chain ends without a
        spec or runs in a circle (no rule table writes either)."""
        chain: list[str] = []
        result: tuple[dict | None, str | None] = (None, None)
        while True:
            key = point_id(point)
            if key in self._resolved:
                result = self._resolved[key]
                break
            if key in chain:
                break
            chain.append(key)
            fields = self.spec_at(point)
            if fields is None:
                break
            if "shares" not in fields:
                result = (fields, key)
                break
            point = fields["shares"]
        for key in chain:
            self._resolved[key] = result
        return result

    def quantizer(self, node: torch.fx.Node) -> dict | None:
        fields = self.modules.get(node.name)
        return fields if fields is not None and fields.get("kind") == "quantizer" else None

    def kind(self, node: torch.fx.Node) -> str:
        """``input``, ``constant``, ``output``, ``quantizer`` (observer / fake-quant),
        ``module``, ``quantize``, ``dequantize`` or ``op`` — what a viewer colours a node by."""
        if node.op == "placeholder":
            return "input"
        if node.op == "get_attr":
            return "constant"
        if node.op == "output":
            return "output"
        if node.op == "call_module":
            return "quantizer" if self.quantizer(node) is not None else "module"
        if is_op(node, _QUANTIZE):
            return "quantize"
        if is_op(node, _DEQUANTIZE):
            return "dequantize"
        return "op"

    # -- quant fields -------------------------------------------------------------------
    def output_quant(self, node: torch.fx.Node) -> dict:
        """The quant fields of ``node``'s output (rules 2-4 of the module docstring)."""
        return (
            self._from_quantizer(node) or self._from_quantize(node) or self._from_annotation(node.name) or _plain(node)
        )

    def edge_quant(self, src: torch.fx.Node, dst: torch.fx.Node) -> dict:
        """The quant fields of the edge ``src -> dst`` (rules 0-5 of the module docstring)."""
        if self.quantizer(dst) is not None or is_op(dst, _QUANTIZE):
            return _plain(src)
        if src.name in (self.annotations.get(dst.name) or {}).get("inputs", {}):
            found = self._from_annotation((src.name, dst.name))
            if found is not None:
                return found
        return (
            self._from_quantizer(src)
            or self._from_quantize(src)
            or (self._from_qdq(dst) if is_op(dst, _DEQUANTIZE) and dst.args and dst.args[0] is src else None)
            or self._from_annotation(src.name)
            or _plain(src)
        )

    def _from_annotation(self, point: str | tuple[str, str]) -> dict | None:
        spec, group = self.resolve(point)
        if spec is None:
            return None
        owner = point if isinstance(point, str) else point[1]
        return _quant(spec, group, self.annotations[owner]["rule"], "annotation")

    def _from_quantizer(self, node: torch.fx.Node) -> dict | None:
        fields = self.quantizer(node)
        return None if fields is None else _quant(fields["spec"], str(node.target), None, "quantizer")

    def _from_quantize(self, node: torch.fx.Node) -> dict | None:
        return self._from_qdq(node) if is_op(node, _QUANTIZE) else None

    def _from_qdq(self, node: torch.fx.Node) -> dict:
        return _quant(qdq_fields(node), None, None, "quantize" if is_op(node, _QUANTIZE) else "dequantize")


def _quant(spec: dict, group: str | None, rule: str | None, source: str) -> dict:
    return {
        "dtype": spec.get("dtype"),
        "quant_min": spec.get("quant_min"),
        "quant_max": spec.get("quant_max"),
        "spec": spec,
        "group": group,
        "rule": rule,
        "source": source,
    }


def _plain(node: torch.fx.Node) -> dict:
    val = node.meta.get("val")
    dtype = _dtype_name(val.dtype) if isinstance(val, torch.Tensor) else None
    return {
        "dtype": dtype,
        "quant_min": None,
        "quant_max": None,
        "spec": None,
        "group": None,
        "rule": None,
        "source": "value",
    }


def qdq_fields(node: torch.fx.Node) -> dict:
    """Spec fields of a quantize / dequantize node from its arguments, found by the op
    schema's argument names (``quant_min``, ``quant_max``, ``dtype``, ``axis``, ``group_size``)."""
    schema = node.target._schema  # type: ignore[union-attr]
    args = {a.name: v for a, v in zip(schema.arguments, node.args)}
    args.update(node.kwargs)
    low, high, dtype = args.get("quant_min"), args.get("quant_max"), args.get("dtype")
    fields: dict = {"type": "qdq", "dtype": _dtype_name(dtype) if isinstance(dtype, torch.dtype) else None}
    if isinstance(low, int) and isinstance(high, int):
        fields.update(quant_min=low, quant_max=high, bits=(high - low).bit_length())
    for name in ("axis", "group_size"):
        if isinstance(args.get(name), int):
            fields[name] = args[name]
    fields["dynamic"] = is_op(node, DYNAMIC_QUANTIZE_OPS | DYNAMIC_DEQUANTIZE_OPS)
    fields["text"] = f"{fields['dtype']}[{low},{high}]"
    return fields


def format_node(graph: DescribedGraph, node: torch.fx.Node) -> str:
    """One listing line: the node, its value, and its specs, rule and module."""
    args = ", ".join([_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()])
    line = f"%{node.name} = {node.op}[{node.target}]({args})"
    val = _fmt_val(node)
    if val:
        line += f" :: {val}"
    notes = []
    if node.op == "call_module":
        notes.append(repr(graph.gm.get_submodule(str(node.target))).replace("\n", " "))
    ann = graph.annotations.get(node.name)
    if ann is not None:
        if ann["output"] is not None:
            notes.append(f"out {_spec_text(ann['output'])}")
        notes.extend(f"in %{name}: {_spec_text(spec)}" for name, spec in ann["inputs"].items())
        notes.append(f"<- {ann['rule']}")
    if node.meta.get(REFUSALS_KEY):
        notes.append("float: " + "; ".join(map(str, node.meta[REFUSALS_KEY])))
    mod = module_path(node)
    if mod:
        notes.append(f"@ {mod}")
    if notes:
        line += "  | " + "; ".join(notes)
    return line


def graph_record(gm: torch.fx.GraphModule) -> dict:
    """The graph as plain data (``nodes``, ``edges``, ``groups``); see the module docstring."""
    graph = DescribedGraph(gm)
    nodes, edges = [], []
    groups: dict[str, list[list[str]]] = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        ann = graph.annotations.get(node.name)
        record = {
            "name": node.name,
            "op": node.op,
            "target": str(node.target),
            "kind": graph.kind(node),
            "value": _fmt_val(node),
            "value_dtype": _dtype_name(val.dtype) if isinstance(val, torch.Tensor) else None,
            "shape": _shape(val),
            "line": format_node(graph, node),
            "module": module_path(node),
            "module_type": _module_type(node),
            "stack_trace": (node.meta.get("stack_trace") or "").strip(),
            **graph.output_quant(node),
            "rule": ann["rule"] if ann is not None else None,
            "anchor": ann["anchor"] if ann is not None else None,
            "output_spec": ann["output"] if ann is not None else None,
            "input_specs": ann["inputs"] if ann is not None else {},
            "quantizer": graph.quantizer(node),
            "refusals": [
                {"rule": r.rule, "reason": r.reason, "kind": r.kind.name} for r in node.meta.get(REFUSALS_KEY, ())
            ],
        }
        nodes.append(record)
        for src in node.all_input_nodes:
            edge = {"src": src.name, "dst": node.name, **graph.edge_quant(src, node)}
            edges.append(edge)
            if edge["group"] is not None:
                groups.setdefault(edge["group"], []).append([src.name, node.name])
    return {"nodes": nodes, "edges": edges, "groups": groups}


def format_graph(gm: torch.fx.GraphModule) -> str:
    """The whole graph, one :func:`format_node` line per node."""
    graph = DescribedGraph(gm)
    return "\n".join(format_node(graph, n) for n in gm.graph.nodes) + "\n"


# ---------------------------------------------------------------------------- files


class GraphDumper:
    """Writes the dumps of one pipeline run into ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._previous: str | None = None
        self._previous_name = ""
        self._written: list[dict] = []

    def write(self, index: int, name: str, gm: torch.fx.GraphModule, modified: bool) -> None:
        record = graph_record(gm)
        text = "\n".join(n["line"] for n in record["nodes"]) + "\n"
        stem = pass_stem(index, name)
        atomic_write_text(self.directory / f"{stem}.txt", text)
        header = {
            "schema": PASS_SCHEMA,
            "index": index,
            "pass": name,
            "modified": modified,
            "node_count": len(record["nodes"]),
        }
        atomic_write_text(self.directory / f"{stem}.json", json.dumps({**header, **record}, separators=(",", ":")))
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
        self._written.append({"stem": stem, **{k: header[k] for k in ("index", "pass", "modified", "node_count")}})

    def write_index(self, records: Iterable["PassRecord"]) -> None:
        """``index.txt`` for people and ``index.json`` for tools; ``records`` are the passes
        after the input, in the order they were written (the input has no seconds)."""
        records = list(records)
        lines = ["pass                      modified  seconds  nodes"]
        for i, r in enumerate(records, start=1):
            lines.append(f"{pass_stem(i, r.name):<25} {str(r.modified):<9} {r.seconds:7.3f}  {r.nodes}")
        atomic_write_text(self.directory / INDEX_TEXT, "\n".join(lines) + "\n")
        seconds = {i: r.seconds for i, r in enumerate(records, start=1)}
        passes = [{**written, "seconds": seconds.get(written["index"])} for written in self._written]
        atomic_write_text(self.directory / INDEX_JSON, json.dumps({"schema": INDEX_SCHEMA, "passes": passes}, indent=1))
