"""One offline HTML page over a dump directory: every pass as a drawing, its listing and diff.

The text dumps (``NNN_<pass>.txt`` / ``.diff``) answer "what changed", but on a graph of a
thousand nodes it is hard to see *where*: which edges got int8, which nodes a pass added,
which backend rule claimed a conv and which source line it came from.
:func:`write_report` turns ``dump_dir/<stage>/NNN_<pass>.json`` (written by
:mod:`qgraph.core.dump`) into ``dump_dir/index.html``:

- a list of the stages (``prepare_qat``, ``prepare_ptq``, ``convert``) and their passes in
  order;
- for the selected pass a layered top-to-bottom drawing (layer = longest path from the
  inputs, order inside a layer = graph order), edges coloured by the dtype they carry
  (int8, uint8, 4-bit values stored in int8, int32, float), quantizer / quantize /
  dequantize nodes drawn with their own shapes, constants hidden unless asked for, the
  nodes this pass added or changed outlined;
- the listing and the diff to the previous pass, added and removed lines highlighted;
- a side panel (``#node-panel``) for the clicked node: target, value, specs, rule, module
  and stack trace;
- a search box and module groups (collapse by depth, click a group to open it, or show one
  module only), so that vit_b_16 (~1000 nodes a pass) stays usable.

The page is one file that works offline: CSS, JS and data are inline, nothing is fetched.
To keep it small every string (listing lines, stack-trace lines, specs) is stored once in
a shared table and passes refer to it by index; a pass whose graph equals the previous
one refers to it instead of repeating it. The browser decodes and draws only the pass
that is selected.

Edge dtypes are decided here, not in the page, from the spec text of the edge (the
consumer's input spec, a quantizer's spec, the ``quant_min, quant_max, dtype`` arguments
of a quantize / dequantize op, the producer's output spec; ``shared with`` followed to the
spec it names), falling back to the dtype of the produced value.
"""

from __future__ import annotations

import ast
import html
import json
import re
from pathlib import Path
from typing import Iterable

from qgraph.core.files import atomic_write_text

STAGE_ORDER = ("prepare_qat", "prepare_ptq", "prepare", "convert")
"""Stages in pipeline order; other stage folders follow alphabetically."""

EDGE_CLASSES = ("float", "int8", "uint8", "int4", "int32", "quant")
"""Edge colour classes; ``int4`` is any integer range of at most 16 values (int8[-8,7])."""

NODE_FIELDS = (
    "name",
    "op",
    "target",
    "kind",
    "value",
    "line",
    "module",
    "module_type",
    "rule",
    "output_spec",
    "quantizer",
)
"""Per-node string fields, in the order the page decodes them."""

_STEM = re.compile(r"^(\d{3})_(.+)$")
_INT_RANGE = re.compile(r"\b(u?int\d+)\[(-?\d+),\s*(-?\d+)\]")
_QDQ_ARGS = re.compile(r",\s*(-?\d+),\s*(-?\d+),\s*(u?int\d+)\)\s*(?:::|$)")
_SHARED = re.compile(r"^shared with (.+)$")
_INDEX_ROW = re.compile(r"^(\d{3}_\S+)\s+(True|False)\s+([\d.]+)\s+(\d+)\s*$")
_MAX_SHARED_HOPS = 16
_PLACEHOLDER = re.compile(r"__(TITLE|CSS|PASSES|DATA|JS)__")


# ---------------------------------------------------------------------------- edge dtypes


def spec_class(text: str | None) -> str | None:
    """The edge class of a spec text (``int8[-128,127] affine PerTensor`` -> ``int8``).

    None when the text says nothing about a dtype (no text, ``shared with ...``).
    """
    if not text or text.startswith("shared with"):
        return None
    if text == "float":
        return "float"
    if text.startswith("DerivedSpec"):
        return "int32"
    match = _INT_RANGE.search(text)
    if match is None:
        return "quant"
    dtype, low, high = match.group(1), int(match.group(2)), int(match.group(3))
    if high - low <= 15:
        return "int4"
    if dtype in ("int8", "uint8", "int32"):
        return dtype
    return "quant"


def _value_class(value: str) -> str:
    dtype = value.split("[", 1)[0]
    return dtype if dtype in ("int8", "uint8", "int32") else "float"


def _shared_point(text: str | None) -> str | tuple | None:
    """``shared with relu_`` -> ``"relu_"``; ``shared with ('a', 'b')`` -> ``("a", "b")``."""
    match = _SHARED.match(text or "")
    if match is None:
        return None
    point = match.group(1).strip()
    if point.startswith("("):
        try:
            parsed = ast.literal_eval(point)
        except (ValueError, SyntaxError):
            return None
        return parsed if isinstance(parsed, tuple) and len(parsed) == 2 else None
    return point


def resolve_shared(text: str | None, nodes: dict[str, dict]) -> str | None:
    """Follow ``shared with <point>`` to the spec text of that point (a few hops at most)."""
    for _ in range(_MAX_SHARED_HOPS):
        point = _shared_point(text)
        if point is None:
            return text
        if isinstance(point, tuple):
            producer, consumer = point
            text = nodes.get(consumer, {}).get("input_specs", {}).get(producer)
            text = text or nodes.get(producer, {}).get("output_spec")
        else:
            text = nodes.get(point, {}).get("output_spec")
    return None


def _qdq_spec(src: dict, dst: dict) -> str | None:
    """``int8[-128,127]`` from the arguments of the quantize / dequantize op on this edge."""
    if src["kind"] == "quantize":
        line = src["line"]
    elif dst["kind"] == "dequantize" and f"](%{src['name']}," in dst["line"]:
        line = dst["line"]
    else:
        return None
    match = _QDQ_ARGS.search(line.split("  | ", 1)[0])
    return f"{match.group(3)}[{match.group(1)},{match.group(2)}]" if match else None


def edge_class(src: dict, dst: dict, nodes: dict[str, dict]) -> str:
    """The dtype class of the edge ``src -> dst`` (one of :data:`EDGE_CLASSES`)."""
    candidates = (
        dst.get("input_specs", {}).get(src["name"]),
        src.get("quantizer") if src["kind"] == "quantizer" else None,
        _qdq_spec(src, dst),
        src.get("output_spec"),
    )
    for text in candidates:
        cls = spec_class(resolve_shared(text, nodes))
        if cls is not None:
            return cls
    return _value_class(src.get("value") or "")


# ---------------------------------------------------------------------------- reading dumps


def _stage_dirs(dump_dir: Path) -> list[Path]:
    """Stage folders holding pass dumps, in pipeline order; ``dump_dir`` itself if it is one."""
    if _pass_stems(dump_dir):
        return [dump_dir]
    dirs = [d for d in dump_dir.iterdir() if d.is_dir() and _pass_stems(d)]
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    return sorted(dirs, key=lambda d: (rank.get(d.name, len(rank)), d.name))


def _pass_stems(stage_dir: Path) -> list[str]:
    stems = {p.stem for p in stage_dir.glob("[0-9][0-9][0-9]_*") if p.suffix in (".json", ".txt")}
    return sorted(stems)


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else None


def _read_seconds(stage_dir: Path) -> dict[str, float]:
    """``{stem: seconds}`` from the stage's ``index.txt`` (absent rows are simply missing)."""
    text = _read_text(stage_dir / "index.txt") or ""
    rows = (_INDEX_ROW.match(line.strip()) for line in text.splitlines())
    return {m.group(1): float(m.group(3)) for m in rows if m}


def _read_record(stage_dir: Path, stem: str) -> dict:
    """The pass JSON, or an empty graph when only the text dump exists."""
    path = stage_dir / f"{stem}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    index, name = _STEM.match(stem).groups()  # type: ignore[union-attr]
    return {"index": int(index), "pass": name, "modified": None, "nodes": [], "edges": []}


# ---------------------------------------------------------------------------- encoding


class StringTable:
    """Stores every distinct string once; callers keep its index (``-1`` for None)."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._ids: dict[str, int] = {}

    def __call__(self, text: str | None) -> int:
        if text is None:
            return -1
        sid = self._ids.get(text)
        if sid is None:
            sid = self._ids[text] = len(self.items)
            self.items.append(text)
        return sid

    def many(self, texts: Iterable[str]) -> list[int]:
        return [self(t) for t in texts]


def _encode_node(node: dict, strings: StringTable) -> list:
    fields = [strings(node.get(f) or None) for f in NODE_FIELDS]
    stack = node.get("stack_trace") or ""
    inputs = [sid for name, spec in node.get("input_specs", {}).items() for sid in (strings(name), strings(spec))]
    return fields + [strings.many(stack.split("\n")) if stack else [], inputs]


def _encode_edges(record: dict) -> list[int]:
    """Flat ``[src, dst, class, ...]`` with node positions and :data:`EDGE_CLASSES` indices."""
    by_name = {n["name"]: n for n in record["nodes"]}
    position = {n["name"]: i for i, n in enumerate(record["nodes"])}
    flat: list[int] = []
    for src, dst in record["edges"]:
        if src in by_name and dst in by_name:
            cls = edge_class(by_name[src], by_name[dst], by_name)
            flat += [position[src], position[dst], EDGE_CLASSES.index(cls)]
    return flat


def _encode_diff(text: str | None, strings: StringTable) -> list[int] | None:
    """Flat ``[tag, string, ...]``: tag 0 context, 1 added, 2 removed, 3 header / hunk."""
    if text is None:
        return None
    flat: list[int] = []
    for line in text.splitlines():
        if line.startswith(("+++", "---")) or not line or line[0] not in " +-":
            flat += [3, strings(line)]
        else:
            flat += [" +-".index(line[0]), strings(line[1:])]
    return flat


def _changes(record: dict, previous: dict | None) -> tuple[list[int], list[int]]:
    """Positions of the nodes this pass added, and of those whose listing line changed."""
    if previous is None:
        return [], []
    before = {n["name"]: n["line"] for n in previous["nodes"]}
    added = [i for i, n in enumerate(record["nodes"]) if n["name"] not in before]
    changed = [i for i, n in enumerate(record["nodes"]) if n["name"] in before and before[n["name"]] != n["line"]]
    return added, changed


def encode_pass(
    record: dict, listing: str | None, diff: str | None, previous: dict | None, strings: StringTable
) -> dict:
    """One pass as the page reads it: nodes and edges as indices, listing, diff, changes.

    ``previous`` is the record of the pass before it in the same stage (None for the first).
    """
    lines = listing.splitlines() if listing is not None else [n["line"] for n in record["nodes"]]
    added, changed = _changes(record, previous)
    return {
        "nodes": [_encode_node(n, strings) for n in record["nodes"]],
        "edges": _encode_edges(record),
        "listing": strings.many(lines),
        "diff": _encode_diff(diff, strings),
        "added": added,
        "changed": changed,
    }


def _collect(dump_dir: Path, strings: StringTable) -> tuple[list[dict], list[dict]]:
    """(pass metadata for the page, encoded pass data) over all stages, in order."""
    metas, datas = [], []
    for stage_dir in _stage_dirs(dump_dir):
        seconds = _read_seconds(stage_dir)
        previous, previous_data = None, None
        for stem in _pass_stems(stage_dir):
            record = _read_record(stage_dir, stem)
            data = encode_pass(
                record,
                _read_text(stage_dir / f"{stem}.txt"),
                _read_text(stage_dir / f"{stem}.diff"),
                previous,
                strings,
            )
            if previous_data is not None and _same_graph(data, previous_data):
                data = {**data, "nodes": None, "edges": None, "same_as": len(datas) - 1}
            metas.append(_pass_meta(stage_dir.name, stem, record, seconds.get(stem), data))
            datas.append(data)
            previous, previous_data = record, (data if data.get("same_as") is None else previous_data)
    return metas, datas


def _same_graph(data: dict, previous: dict) -> bool:
    return data["nodes"] == previous["nodes"] and data["edges"] == previous["edges"]


def _pass_meta(stage: str, stem: str, record: dict, seconds: float | None, data: dict) -> dict:
    return {
        "stage": stage,
        "stem": stem,
        "index": record.get("index"),
        "pass": record.get("pass", stem[4:]),
        "modified": record.get("modified"),
        "seconds": seconds,
        "nodes": len(record["nodes"]),
        "added": len(data["added"]),
        "changed": len(data["changed"]),
    }


# ---------------------------------------------------------------------------- HTML


def _json_script(element_id: str, payload: object) -> str:
    """Inline JSON that cannot end its ``<script>`` early (``<`` is escaped)."""
    text = json.dumps(payload, separators=(",", ":")).replace("<", "\\u003c")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _pass_list_html(metas: list[dict]) -> str:
    """The stages and their passes, in order, as the sidebar navigation."""
    parts, stage = [], None
    for k, meta in enumerate(metas):
        if meta["stage"] != stage:
            if stage is not None:
                parts.append("</ol>")
            stage = meta["stage"]
            parts.append(f'<h3 class="stage">{html.escape(stage)}</h3><ol class="stage-passes">')
        parts.append(_pass_item_html(k, meta))
    if stage is not None:
        parts.append("</ol>")
    return "\n".join(parts)


def _pass_item_html(k: int, meta: dict) -> str:
    modified = {True: "modified", False: "unchanged", None: ""}[meta["modified"]]
    seconds = f'{meta["seconds"]:.3f}s' if meta["seconds"] is not None else ""
    title = f'{meta["nodes"]} nodes, {meta["added"]} added, {meta["changed"]} changed {seconds}'.strip()
    attrs = " ".join(
        f'{key}="{html.escape(str(value))}"'
        for key, value in (
            ("class", f"pass {modified}"),
            ("data-k", k),
            ("data-stage", meta["stage"]),
            ("data-pass", meta["pass"]),
            ("data-stem", meta["stem"]),
            ("title", title),
        )
    )
    return (
        f'<li {attrs}><span class="idx">{html.escape(meta["stem"][:3])}</span> '
        f'<span class="pname">{html.escape(meta["pass"])}</span> '
        f'<span class="count">{meta["nodes"]}</span></li>'
    )


def render_html(title: str, metas: list[dict], datas: list[dict], strings: StringTable) -> str:
    """The whole page; data for pass ``k`` sits in ``<script id="pass-k">``, parsed on demand."""
    meta = {"passes": metas, "edge_classes": list(EDGE_CLASSES), "fields": list(NODE_FIELDS)}
    scripts = [_json_script("qgraph-meta", meta), _json_script("qgraph-strings", strings.items)]
    scripts += [_json_script(f"pass-{k}", data) for k, data in enumerate(datas)]
    parts = {
        "TITLE": html.escape(title),
        "CSS": _CSS,
        "PASSES": _pass_list_html(metas),
        "DATA": "\n".join(scripts),
        "JS": _JS,
    }
    # One pass over the template, so that data never has a placeholder substituted into it.
    page = _PLACEHOLDER.sub(lambda m: parts[m.group(1)], _TEMPLATE)
    # ASCII only (JSON is already escaped): the file reads the same whatever the locale.
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def write_report(dump_dir: str | Path) -> Path:
    """Write ``dump_dir/index.html``: one offline page over every stage and pass dumped there.

    ``dump_dir`` is what was passed as ``dump_dir=`` to :func:`qgraph.prepare_qat`,
    :func:`qgraph.prepare_ptq` or :func:`qgraph.convert` (several stages may share it), or
    one stage folder of it. The file is written atomically. Returns its path.

    Raises :class:`FileNotFoundError` when the folder holds no pass dumps.
    """
    root = Path(dump_dir)
    if not root.is_dir() or not _stage_dirs(root):
        raise FileNotFoundError(
            f"no pass dumps (NNN_<pass>.json) in {root}: run qgraph.prepare_qat / prepare_ptq / "
            f"convert with dump_dir={str(root)!r} (or QGRAPH_DUMP={root}) first"
        )
    strings = StringTable()
    metas, datas = _collect(root, strings)
    out = root / "index.html"
    atomic_write_text(out, render_html(f"qgraph passes: {root.resolve().name}", metas, datas, strings))
    return out


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1>
  <span id="pass-title"></span>
  <input id="search" type="search" placeholder="search nodes (name, target, module)  [/]" autocomplete="off">
  <span id="search-count"></span>
</header>
<aside id="sidebar">
  <nav id="passes">
__PASSES__
  </nav>
  <section id="controls">
    <h3>view</h3>
    <label><input type="checkbox" id="show-constants"> show constants</label>
    <label>collapse modules at depth
      <select id="collapse-depth"><option value="0">none</option><option value="1">1</option>
      <option value="2">2</option><option value="3">3</option><option value="4">4</option>
      <option value="5">5</option><option value="6">6</option></select></label>
    <label>only module <select id="module-filter"><option value="">(all)</option></select></label>
    <div class="zoom"><button id="zoom-out" title="zoom out">&minus;</button>
      <button id="zoom-fit" title="fit width">fit</button>
      <button id="zoom-in" title="zoom in">+</button>
      <button id="expand-all" title="open every module group">expand all</button></div>
    <p id="view-note"></p>
  </section>
  <section id="legend">
    <h3>edges</h3>
    <div><i class="sw c-int8"></i>int8</div><div><i class="sw c-uint8"></i>uint8</div>
    <div><i class="sw c-int4"></i>4-bit (in int8)</div><div><i class="sw c-int32"></i>int32</div>
    <div><i class="sw c-quant"></i>other quantized</div><div><i class="sw c-float"></i>float</div>
    <h3>nodes</h3>
    <div><i class="nd k-quantizer"></i>observer / fake-quant</div>
    <div><i class="nd k-quantize"></i>quantize</div><div><i class="nd k-dequantize"></i>dequantize</div>
    <div><i class="nd k-input"></i>input / output</div><div><i class="nd k-group"></i>module group (click)</div>
    <div><i class="nd added"></i>added by this pass</div><div><i class="nd changed"></i>changed by this pass</div>
  </section>
</aside>
<main id="main">
  <div id="graph-area"><div id="graph-wrap"><svg id="graph" role="img" aria-label="graph of the selected pass"></svg></div>
    <ol id="search-results"></ol></div>
  <div id="textpane">
    <div class="tabs"><button id="tab-diff" class="tab active" data-tab="diff">diff to previous pass</button>
      <button id="tab-listing" class="tab" data-tab="listing">listing</button></div>
    <div id="diff" class="pane"></div>
    <div id="listing" class="pane hidden"></div>
  </div>
</main>
<aside id="node-panel" class="empty">
  <p class="hint">Click a node in the drawing, the listing or the search results.</p>
  <h2 class="name"></h2>
  <p class="status"></p>
  <dl>
    <dt>kind</dt><dd class="kind"></dd>
    <dt>target</dt><dd class="target"></dd>
    <dt>value</dt><dd class="value"></dd>
    <dt>quant specs</dt><dd class="spec"></dd>
    <dt>rule</dt><dd class="rule"></dd>
    <dt>quantizer</dt><dd class="quantizer"></dd>
    <dt>module</dt><dd class="module"></dd>
    <dt>module type</dt><dd class="module-type"></dd>
    <dt>source</dt><dd class="source"></dd>
    <dt>stack trace</dt><dd><pre class="stack"></pre></dd>
    <dt>listing line</dt><dd><pre class="line"></pre></dd>
    <dt>inputs</dt><dd class="preds"></dd>
    <dt>users</dt><dd class="succs"></dd>
  </dl>
</aside>
__DATA__
<script>__JS__</script>
</body>
</html>
"""

_CSS = """
* { box-sizing: border-box; }
body { margin: 0; height: 100vh; overflow: hidden; display: grid; grid-template-columns: 240px minmax(0, 1fr) 380px;
  grid-template-rows: auto minmax(0, 1fr); font: 13px/1.35 system-ui, sans-serif; color: #222; }
header { grid-column: 1 / 4; display: flex; gap: 12px; align-items: center; padding: 6px 10px;
  background: #263238; color: #eceff1; }
header h1 { font-size: 15px; margin: 0; font-weight: 600; }
#pass-title { font-family: ui-monospace, monospace; color: #b2dfdb; }
#search { margin-left: auto; width: 320px; padding: 3px 6px; }
#sidebar { overflow: auto; border-right: 1px solid #ccc; padding: 6px 8px; background: #fafafa; }
#sidebar h3 { font-size: 12px; text-transform: uppercase; color: #607d8b; margin: 10px 0 4px; }
ol.stage-passes { list-style: none; margin: 0; padding: 0; }
li.pass { cursor: pointer; padding: 2px 4px; border-radius: 3px; display: flex; gap: 6px; }
li.pass:hover { background: #e3f2fd; }
li.pass.active { background: #1565c0; color: #fff; }
li.pass .idx { font-family: ui-monospace, monospace; color: #90a4ae; }
li.pass .count { margin-left: auto; color: #90a4ae; font-size: 11px; }
li.pass.unchanged .pname { color: #999; }
li.pass.active .idx, li.pass.active .count, li.pass.active.unchanged .pname { color: #e3f2fd; }
#controls label { display: block; margin: 4px 0; }
#controls select { max-width: 210px; }
#view-note { color: #666; font-size: 11px; }
#legend div { display: flex; align-items: center; gap: 6px; font-size: 12px; }
.sw { display: inline-block; width: 22px; height: 0; border-top: 3px solid; }
.nd { display: inline-block; width: 18px; height: 11px; border: 1px solid #78909c; background: #fff; }
.nd.k-quantizer { background: #ffe0b2; border-color: #ef6c00; border-radius: 6px; }
.nd.k-quantize { background: #e1bee7; border-color: #7b1fa2; }
.nd.k-dequantize { background: #b2dfdb; border-color: #00796b; }
.nd.k-input { background: #dcedc8; border-radius: 6px; }
.nd.k-group { background: #e3f2fd; border: 2px double #1565c0; }
.nd.added { border: 2px solid #2e7d32; }
.nd.changed { border: 2px dashed #f9a825; }
#main { display: grid; grid-template-rows: minmax(0, 3fr) minmax(0, 2fr); min-width: 0; min-height: 0; }
#main > * { min-width: 0; min-height: 0; }
#graph-area { position: relative; border-bottom: 1px solid #ccc; }
#graph-wrap { overflow: auto; height: 100%; background: #fff; }
#graph { display: block; }
#graph .edge { fill: none; stroke-width: 1.4; }
.c-float { stroke: #b0bec5; border-color: #b0bec5; }
.c-int8 { stroke: #1e88e5; border-color: #1e88e5; }
.c-uint8 { stroke: #43a047; border-color: #43a047; }
.c-int4 { stroke: #d81b60; border-color: #d81b60; }
.c-int32 { stroke: #6d4c41; border-color: #6d4c41; }
.c-quant { stroke: #fb8c00; border-color: #fb8c00; }
#graph .edge:not(.c-float) { stroke-width: 2.4; }
#graph .edge.long { opacity: 0.45; }
#graph .edge.hl { stroke-width: 4; opacity: 1; }
#graph .node { cursor: pointer; }
#graph .node .shape { fill: #fff; stroke: #78909c; stroke-width: 1.2; }
#graph .k-op .shape { fill: #f5f5f5; }
#graph .k-module .shape { fill: #eceff1; }
#graph .k-input .shape, #graph .k-output .shape { fill: #dcedc8; stroke: #558b2f; }
#graph .k-constant .shape { fill: #fafafa; stroke-dasharray: 3 2; }
#graph .k-quantizer .shape { fill: #ffe0b2; stroke: #ef6c00; }
#graph .k-quantize .shape { fill: #e1bee7; stroke: #7b1fa2; }
#graph .k-dequantize .shape { fill: #b2dfdb; stroke: #00796b; }
#graph .k-group .shape { fill: #e3f2fd; stroke: #1565c0; stroke-width: 3; }
#graph .node.added .shape { stroke: #2e7d32; stroke-width: 3; }
#graph .node.changed .shape { stroke: #f9a825; stroke-width: 3; stroke-dasharray: 6 3; }
#graph .node.selected .shape { stroke: #d50000; stroke-width: 4; stroke-dasharray: none; }
#graph.searching .node { opacity: 0.25; }
#graph.searching .node.match { opacity: 1; }
#graph .node.match .shape { stroke: #d50000; stroke-width: 3; }
#graph text { font: 11px ui-monospace, monospace; text-anchor: middle; pointer-events: none; }
#graph text.sub { fill: #666; font-size: 10px; }
#search-results { position: absolute; top: 4px; right: 18px; margin: 0; padding: 4px 8px;
  max-height: 60%; overflow: auto; width: 330px; background: #fffde7; border: 1px solid #fbc02d;
  list-style: none; font-size: 12px; z-index: 2; }
#search-results:empty { display: none; }
#search-results li { cursor: pointer; padding: 1px 2px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
#search-results li:hover { background: #fff59d; }
#search-results .kind { color: #888; }
#textpane { display: flex; flex-direction: column; min-height: 0; }
.tabs { display: flex; gap: 2px; padding: 2px 4px 0; background: #eceff1; }
.tab { border: 1px solid #ccc; border-bottom: none; background: #e0e0e0; padding: 3px 10px; cursor: pointer; }
.tab.active { background: #fff; font-weight: 600; }
.pane { flex: 1; overflow: auto; font: 12px/1.4 ui-monospace, monospace; white-space: pre; padding: 4px 0; }
.pane.hidden { display: none; }
.pane > div { padding: 0 8px; min-width: max-content; }
.pane [data-name] { cursor: pointer; }
.pane .sel { background: #ffecb3; }
#diff .add { background: #e6ffed; color: #1b5e20; }
#diff .del { background: #ffeef0; color: #b71c1c; }
#diff .hunk { background: #e3f2fd; color: #0d47a1; }
#diff .hdr { color: #777; }
.pane .note { color: #777; font-family: system-ui, sans-serif; white-space: normal; }
#node-panel { overflow: auto; border-left: 1px solid #ccc; padding: 6px 10px; background: #fcfcfc; }
#node-panel .hint { color: #777; }
#node-panel:not(.empty) .hint, #node-panel.empty dl { display: none; }
#node-panel h2 { font: 600 15px ui-monospace, monospace; margin: 4px 0; word-break: break-all; }
#node-panel .status { margin: 0; color: #2e7d32; font-weight: 600; }
#node-panel dt { font-size: 11px; text-transform: uppercase; color: #607d8b; margin-top: 8px; }
#node-panel dd { margin: 0; word-break: break-word; font-family: ui-monospace, monospace; font-size: 12px; }
#node-panel pre { margin: 0; white-space: pre-wrap; word-break: break-all; font-size: 11px;
  background: #f5f5f5; padding: 4px; }
#node-panel .stack .lib { color: #999; }
#node-panel .spec ul { margin: 2px 0; padding-left: 16px; }
#node-panel a.collapse { color: inherit; cursor: pointer; text-decoration: underline dotted; }
#node-panel a.nav { color: #1565c0; cursor: pointer; margin-right: 6px; display: inline-block; }
"""

_JS = r"""
(function () {
  "use strict";
  const $ = (sel, root) => (root || document).querySelector(sel);
  const META = JSON.parse($("#qgraph-meta").textContent);
  const STR = JSON.parse($("#qgraph-strings").textContent);
  const FIELDS = META.fields, CLASSES = META.edge_classes;
  const NODE_W = 168, NODE_H = 34, GAP_X = 22, GAP_Y = 30, MARGIN = 16;
  const AUTO_COLLAPSE_ABOVE = 500, COLLAPSED_TARGET = 250;
  const cache = new Map();
  const state = { k: -1, P: null, view: null, sel: null, showConst: false, filter: "",
                  depth: 0, collapsed: new Set(), expanded: new Set(), query: "", zoom: 1, tab: "diff" };

  const s = (i) => (i < 0 ? null : STR[i]);
  const esc = (t) => String(t == null ? "" : t).replace(/[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  // ------------------------------------------------------------------ decoding
  function rawPass(k) { return JSON.parse(document.getElementById("pass-" + k).textContent); }

  function decodeGraph(raw) {
    const nodes = raw.nodes.map((row, i) => {
      const n = { i: i };
      FIELDS.forEach((f, j) => { n[f] = s(row[j]); });
      n.module = n.module || "";
      n.stack = row[FIELDS.length].map(s).join("\n");
      const inp = row[FIELDS.length + 1], inputs = [];
      for (let j = 0; j < inp.length; j += 2) inputs.push([s(inp[j]), s(inp[j + 1])]);
      n.inputs = inputs;
      return n;
    });
    const edges = [], preds = nodes.map(() => []), succs = nodes.map(() => []);
    for (let j = 0; j < raw.edges.length; j += 3) {
      const e = { s: raw.edges[j], d: raw.edges[j + 1], c: CLASSES[raw.edges[j + 2]] };
      edges.push(e); preds[e.d].push(e.s); succs[e.s].push(e.d);
    }
    const byName = new Map(nodes.map((n) => [n.name, n]));
    return { nodes, edges, preds, succs, byName };
  }

  function decodePass(k) {
    if (cache.has(k)) return cache.get(k);
    const raw = rawPass(k);
    const graph = raw.same_as != null ? decodePass(raw.same_as).graph : decodeGraph(raw);
    const status = new Map();
    raw.added.forEach((i) => status.set(i, "added"));
    raw.changed.forEach((i) => status.set(i, "changed"));
    const diff = [];
    if (raw.diff) for (let j = 0; j < raw.diff.length; j += 2) diff.push([raw.diff[j], s(raw.diff[j + 1])]);
    const P = { k, meta: META.passes[k], graph, status, listing: raw.listing.map(s), diff: raw.diff ? diff : null };
    cache.set(k, P);
    return P;
  }

  // ------------------------------------------------------------------ view model
  function inFilter(n) {
    const f = state.filter;
    return !f || n.module === f || n.module.startsWith(f + ".");
  }
  function visible(n) { return (state.showConst || n.kind !== "constant") && inFilter(n); }

  function groupOf(n, depth) {
    if (!n.module || n.kind === "input" || n.kind === "output") return null;
    const parts = n.module.split(".");
    for (let j = 1; j <= parts.length; j++) {
      const p = parts.slice(0, j).join(".");
      if (state.collapsed.has(p)) return p;
    }
    if (!depth) return null;
    for (let j = depth; j <= parts.length; j++) {
      const p = parts.slice(0, j).join(".");
      if (!state.expanded.has(p)) return p;
    }
    return null;
  }

  function buildUnits(G, depth) {
    const units = [], unitOf = new Int32Array(G.nodes.length).fill(-1), byKey = new Map();
    for (const n of G.nodes) {
      if (!visible(n)) continue;
      const g = groupOf(n, depth), key = g === null ? "n:" + n.name : "g:" + g;
      let u = byKey.get(key);
      if (!u) {
        u = { id: units.length, key, group: g, kind: g === null ? n.kind : "group", nodes: [] };
        units.push(u); byKey.set(key, u);
      }
      u.nodes.push(n); unitOf[n.i] = u.id;
    }
    return { units, unitOf };
  }

  function buildEdges(G, unitOf) {
    const edges = new Map();
    for (const e of G.edges) {
      const a = unitOf[e.s], b = unitOf[e.d];
      if (a < 0 || b < 0 || a === b) continue;
      const key = a + ">" + b, old = edges.get(key);
      if (!old) edges.set(key, { a, b, c: e.c, s: e.s, d: e.d });
      else if (old.c === "float" && e.c !== "float") old.c = e.c;
    }
    return [...edges.values()];
  }

  // Layer = longest path from the inputs, in graph order. Boxes no input reaches (weights and
  // the ops that prepare them from constants) sit as late as possible: just above their user.
  // Only edges that go forward in graph order count (grouping modules can make cycles).
  function assignLayers(units, edges) {
    const layer = new Int32Array(units.length), preds = units.map(() => []), succs = units.map(() => []);
    const fromInput = units.map((u) => u.entry);
    for (const e of edges) if (e.a < e.b) { preds[e.b].push(e.a); succs[e.a].push(e.b); }
    for (const u of units) {
      for (const p of preds[u.id]) { layer[u.id] = Math.max(layer[u.id], layer[p] + 1); fromInput[u.id] ||= fromInput[p]; }
    }
    for (let i = units.length - 1; i >= 0; i--) {
      if (fromInput[i] || !succs[i].length) continue;
      layer[i] = Math.min(...succs[i].map((v) => layer[v])) - 1;
    }
    // Side effects nothing uses (BN's num_batches_tracked += 1) go next to their graph-order neighbour.
    let recent = 0;
    units.forEach((u, i) => {
      if (fromInput[i]) recent = layer[i];
      else if (!succs[i].length) layer[i] = Math.max(layer[i], recent);
    });
    const low = Math.min(0, ...layer);
    return layer.map((l) => l - low);
  }

  function place(units, layer) {
    const rows = [];
    units.forEach((u) => { (rows[layer[u.id]] = rows[layer[u.id]] || []).push(u); });
    const widest = Math.max(1, ...rows.map((r) => (r ? r.length : 0)));
    const width = widest * (NODE_W + GAP_X) - GAP_X + 2 * MARGIN;
    rows.forEach((row, y) => {
      if (!row) return;
      const offset = (width - (row.length * (NODE_W + GAP_X) - GAP_X)) / 2;
      row.forEach((u, x) => { u.x = offset + x * (NODE_W + GAP_X); u.y = MARGIN + y * (NODE_H + GAP_Y); });
    });
    return { width, height: Math.max(60, 2 * MARGIN + rows.length * (NODE_H + GAP_Y) - GAP_Y) };
  }

  // Entries of the drawing: graph inputs, and boxes fed by nodes the module filter hides.
  function markEntries(G, units, unitOf) {
    const hiddenProducer = (p) => unitOf[p] < 0 && G.nodes[p].kind !== "constant";
    for (const u of units) u.entry = u.kind === "input" || u.nodes.some((n) => G.preds[n.i].some(hiddenProducer));
  }

  function buildView(P, depth) {
    const G = P.graph, { units, unitOf } = buildUnits(G, depth);
    markEntries(G, units, unitOf);
    const edges = buildEdges(G, unitOf);
    const size = place(units, assignLayers(units, edges));
    return { units, unitOf, edges, width: size.width, height: size.height };
  }

  function countUnits(P, depth) { return buildUnits(P.graph, depth).units.length; }

  // Large graphs open collapsed at the deepest module depth that keeps the drawing small.
  function chooseDepth(P) {
    if (countUnits(P, 0) <= AUTO_COLLAPSE_ABOVE) return 0;
    const deepest = Math.max(1, ...P.graph.nodes.map((n) => (n.module ? n.module.split(".").length : 0)));
    for (let d = Math.min(deepest, 6); d >= 1; d--) if (countUnits(P, d) <= COLLAPSED_TARGET) return d;
    return 1;
  }

  // ------------------------------------------------------------------ drawing
  function shapeSvg(kind) {
    const w = NODE_W, h = NODE_H;
    switch (kind) {
      case "quantizer":
        return `<polygon class="shape" points="10,0 ${w - 10},0 ${w},${h / 2} ${w - 10},${h} 10,${h} 0,${h / 2}"/>`;
      case "quantize": return `<polygon class="shape" points="0,0 ${w},0 ${w - 14},${h} 14,${h}"/>`;
      case "dequantize": return `<polygon class="shape" points="14,0 ${w - 14},0 ${w},${h} 0,${h}"/>`;
      case "input": case "output": return `<rect class="shape" width="${w}" height="${h}" rx="${h / 2}"/>`;
      case "group": return `<rect class="shape" width="${w}" height="${h}" rx="3"/>`;
      default: return `<rect class="shape" width="${w}" height="${h}" rx="6"/>`;
    }
  }

  function shortTarget(n) {
    if (n.kind === "quantizer" && n.quantizer) return n.quantizer.split("(")[0];
    return String(n.target || "").replace(/^aten\./, "").replace(/^quantized_decomposed\./, "").replace(/\.default$/, "");
  }
  // Names differ at their end (conv2d_12, dequantize_per_tensor_default_7): keep both ends.
  function clip(t, m) {
    if (t.length <= m) return t;
    return t.slice(0, Math.ceil((m - 1) / 2)) + "\u2026" + t.slice(t.length - Math.floor((m - 1) / 2));
  }
  const unitName = (u) => (u.group !== null ? u.group : u.nodes[0].name);

  function unitSvg(P, u) {
    let cls = "node k-" + u.kind, attrs, label, sub, title;
    if (u.group !== null) {
      const st = u.nodes.map((n) => P.status.get(n.i)).filter(Boolean);
      if (st.includes("added")) cls += " added"; else if (st.length) cls += " changed";
      attrs = `data-group="${esc(u.group)}"`;
      label = u.group.split(".").slice(-2).join(".");
      sub = u.nodes.length + " nodes";
      title = `${u.group} (${u.nodes.length} nodes): click to open`;
    } else {
      const n = u.nodes[0], st = P.status.get(n.i);
      if (st) cls += " " + st;
      attrs = `data-name="${esc(n.name)}"`;
      label = n.name; sub = shortTarget(n); title = n.name + (n.module ? " @ " + n.module : "");
    }
    return `<g class="${cls}" ${attrs} transform="translate(${u.x},${u.y})">${shapeSvg(u.kind)}` +
      `<text x="${NODE_W / 2}" y="14">${esc(clip(label, 24))}</text>` +
      `<text class="sub" x="${NODE_W / 2}" y="27">${esc(clip(sub, 27))}</text><title>${esc(title)}</title></g>`;
  }

  function edgeSvg(view, e) {
    const A = view.units[e.a], B = view.units[e.b];
    const x1 = A.x + NODE_W / 2, y1 = A.y + NODE_H, x2 = B.x + NODE_W / 2, y2 = B.y;
    const dy = Math.max(GAP_Y, Math.abs(y2 - y1) / 3);
    const long = B.y - A.y > 4 * (NODE_H + GAP_Y) ? " long" : "";
    return `<path class="edge c-${e.c}${long}" data-a="${e.a}" data-b="${e.b}" ` +
      `data-src="${esc(unitName(A))}" data-dst="${esc(unitName(B))}" ` +
      `d="M${x1},${y1} C${x1},${y1 + dy} ${x2},${y2 - dy} ${x2},${y2}"/>`;
  }

  function renderGraph() {
    const P = state.P, svg = $("#graph");
    const view = state.view = buildView(P, state.depth);
    svg.setAttribute("viewBox", `0 0 ${view.width} ${view.height}`);
    applyZoom();
    if (!P.graph.nodes.length) {
      svg.innerHTML = `<text x="20" y="30">no graph data (JSON) for this pass: see the listing</text>`;
      $("#view-note").textContent = "";
      return;
    }
    svg.innerHTML = view.edges.map((e) => edgeSvg(view, e)).join("") + view.units.map((u) => unitSvg(P, u)).join("");
    const groups = view.units.filter((u) => u.group !== null).length;
    $("#view-note").textContent = `${view.units.length} boxes drawn for ${P.graph.nodes.length} nodes` +
      (groups ? `; ${groups} module groups (click one to open it)` : "");
    applySearch(false);
    if (state.sel) markSelected(state.sel, false);
  }

  function applyZoom() {
    const v = state.view, svg = $("#graph");
    if (!v) return;
    svg.setAttribute("width", Math.ceil(v.width * state.zoom));
    svg.setAttribute("height", Math.ceil(v.height * state.zoom));
  }

  // ------------------------------------------------------------------ text panes
  function nameOfLine(text) {
    const m = /^%([\w.]+) = /.exec(text || "");
    return m ? m[1] : null;
  }

  function lineDiv(cls, text) {
    const name = nameOfLine(text.replace(/^[ +-]/, ""));
    return `<div class="${cls}"${name ? ` data-name="${esc(name)}"` : ""}>${esc(text) || " "}</div>`;
  }

  function renderListing() {
    $("#listing").innerHTML = state.P.listing.map((t) => lineDiv("ln", t)).join("");
  }

  function renderDiff() {
    const P = state.P, box = $("#diff");
    if (P.diff === null) { box.innerHTML = `<p class="note">First pass of the stage: nothing to compare with.</p>`; return; }
    if (!P.diff.length) { box.innerHTML = `<p class="note">No change to the listing.</p>`; return; }
    const cls = ["ctx", "add", "del", "hdr"], prefix = [" ", "+", "-", ""];
    box.innerHTML = P.diff.map(([tag, t]) =>
      lineDiv(tag === 3 && t.startsWith("@@") ? "hunk" : cls[tag], prefix[tag] + t)).join("");
  }

  function showTab(tab) {
    state.tab = tab;
    document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === tab));
    $("#diff").classList.toggle("hidden", tab !== "diff");
    $("#listing").classList.toggle("hidden", tab !== "listing");
  }

  // ------------------------------------------------------------------ node panel
  function frames(stack) {
    const out = [], re = /File "([^"]+)", line (\d+), in (\S+)\n?\s*(.*)/g;
    let m;
    while ((m = re.exec(stack))) out.push({ file: m[1], line: m[2], fn: m[3], code: m[4] });
    return out;
  }
  const isLib = (f) => /\/torch\/(nn|fx|_|autograd|utils)/.test(f.file) || /\/torch\/[^/]+\.py$/.test(f.file);

  function stackHtml(stack) {
    const fr = frames(stack);
    if (!fr.length) return esc(stack || "(none)");
    return fr.map((f) => `<span class="${isLib(f) ? "lib" : "user"}">` +
      `${esc(f.file)}:${f.line} in ${esc(f.fn)}\n    ${esc(f.code)}</span>`).join("\n");
  }

  function sourceText(stack) {
    const fr = frames(stack), user = fr.filter((f) => !isLib(f));
    const f = user.length ? user[user.length - 1] : fr[fr.length - 1];
    return f ? `${f.file}:${f.line}  ${f.code}` : "(no stack trace)";
  }

  function specHtml(n) {
    const out = `<div class="out">out: ${esc(n.output_spec || (n.rule ? "float" : "\u2014"))}</div>`;
    const ins = n.inputs.map(([name, spec]) => `<li data-input="${esc(name)}">%${esc(name)}: ${esc(spec)}</li>`).join("");
    return out + (ins ? `<ul class="inputs">${ins}</ul>` : "");
  }

  // Each prefix of the module path is a link that collapses that module into one box.
  function moduleLinks(module) {
    if (!module) return "\u2014";
    const parts = module.split(".");
    return parts.map((part, j) => `<a class="collapse" data-module="${esc(parts.slice(0, j + 1).join("."))}" ` +
      `title="collapse ${esc(parts.slice(0, j + 1).join("."))} into one box">${esc(part)}</a>`).join(".");
  }

  function navLinks(P, idx) {
    const names = idx.map((i) => esc(P.graph.nodes[i].name));
    return names.map((name) => `<a class="nav" data-name="${name}">%${name}</a>`).join(" ") || "\u2014";
  }

  function showPanel(n) {
    const P = state.P, panel = $("#node-panel");
    const set = (sel, t) => { $(sel, panel).textContent = t == null || t === "" ? "\u2014" : t; };
    panel.classList.remove("empty");
    panel.dataset.name = n.name;
    set(".name", n.name);
    const st = P.status.get(n.i);
    $(".status", panel).textContent = st ? `${st} by pass ${P.meta.stem}` : "";
    set(".kind", n.kind + " (" + n.op + ")");
    set(".target", n.target); set(".value", n.value); set(".rule", n.rule);
    set(".quantizer", n.quantizer); set(".module-type", n.module_type);
    $(".module", panel).innerHTML = moduleLinks(n.module);
    set(".source", n.stack ? sourceText(n.stack) : null);
    set(".line", n.line);
    $(".spec", panel).innerHTML = specHtml(n);
    $(".stack", panel).innerHTML = stackHtml(n.stack);
    $(".preds", panel).innerHTML = navLinks(P, P.graph.preds[n.i]);
    $(".succs", panel).innerHTML = navLinks(P, P.graph.succs[n.i]);
  }

  function clearPanel() { const p = $("#node-panel"); p.classList.add("empty"); delete p.dataset.name; }

  // ------------------------------------------------------------------ selection
  function markSelected(name, scroll) {
    const svg = $("#graph");
    svg.querySelectorAll(".selected").forEach((e) => e.classList.remove("selected"));
    svg.querySelectorAll(".edge.hl").forEach((e) => e.classList.remove("hl"));
    const n = state.P.graph.byName.get(name), v = state.view;
    if (!n || !v) return;
    const uid = v.unitOf[n.i];
    const g = uid < 0 ? null : svg.querySelector(`g.node[data-name="${CSS.escape(name)}"]`) ||
      svg.querySelector(`g.node[data-group="${CSS.escape(v.units[uid].group || "")}"]`);
    if (g) g.classList.add("selected");
    if (uid >= 0) {
      svg.querySelectorAll(`.edge[data-a="${uid}"], .edge[data-b="${uid}"]`).forEach((e) => e.classList.add("hl"));
    }
    if (scroll && uid >= 0) {
      const u = v.units[uid], wrap = $("#graph-wrap");
      wrap.scrollTo({ left: (u.x + NODE_W / 2) * state.zoom - wrap.clientWidth / 2,
                      top: (u.y + NODE_H / 2) * state.zoom - wrap.clientHeight / 2 });
    }
  }

  function markLines(name) {
    document.querySelectorAll(".pane .sel").forEach((e) => e.classList.remove("sel"));
    if (!name) return;
    document.querySelectorAll(`.pane [data-name="${CSS.escape(name)}"]`).forEach((e) => e.classList.add("sel"));
    const pane = $("#" + state.tab), line = pane && pane.querySelector(".sel");
    if (line) line.scrollIntoView({ block: "nearest" });
  }

  function select(name, scroll) {
    const n = state.P.graph.byName.get(name);
    if (!n) return;
    state.sel = name;
    showPanel(n); markSelected(name, scroll); markLines(name); writeHash();
  }

  // Make the node drawable (constants, module filter, collapsed groups), then select it.
  function reveal(name) {
    const n = state.P.graph.byName.get(name);
    if (!n) return;
    let redraw = false;
    if (n.kind === "constant" && !state.showConst) {
      state.showConst = true; $("#show-constants").checked = true; redraw = true;
    }
    if (!inFilter(n)) { state.filter = ""; $("#module-filter").value = ""; redraw = true; }
    for (let g = groupOf(n, state.depth); g !== null; g = groupOf(n, state.depth)) {
      if (state.collapsed.has(g)) state.collapsed.delete(g); else state.expanded.add(g);
      redraw = true;
    }
    if (redraw) renderGraph();
    select(name, true);
  }

  function collapseModule(prefix) {
    state.collapsed.add(prefix);
    for (const p of [...state.expanded]) if (p === prefix || p.startsWith(prefix + ".")) state.expanded.delete(p);
    renderGraph();
    if (state.sel) markSelected(state.sel, true);
  }

  function openGroup(prefix) {
    if (state.collapsed.has(prefix)) state.collapsed.delete(prefix); else state.expanded.add(prefix);
    renderGraph();
  }

  // ------------------------------------------------------------------ search
  function matches(n, q) {
    return n.name.toLowerCase().includes(q) || String(n.target).toLowerCase().includes(q) ||
      n.module.toLowerCase().includes(q);
  }

  function applySearch(list) {
    const q = state.query.trim().toLowerCase(), svg = $("#graph"), P = state.P;
    svg.classList.toggle("searching", !!q);
    svg.querySelectorAll(".node.match").forEach((e) => e.classList.remove("match"));
    if (!q) { $("#search-results").innerHTML = ""; $("#search-count").textContent = ""; return; }
    const rank = (n) => {  // exact name first, then names that start with the query
      const name = n.name.toLowerCase();
      return name === q ? 0 : name.startsWith(q) ? 1 : name.includes(q) ? 2 : 3;
    };
    const found = P.graph.nodes.filter((n) => matches(n, q)).sort((a, b) => rank(a) - rank(b) || a.i - b.i);
    const hitUnits = new Set(found.map((n) => state.view.unitOf[n.i]).filter((u) => u >= 0));
    svg.querySelectorAll(".node").forEach((g, j) => { if (hitUnits.has(j)) g.classList.add("match"); });
    $("#search-count").textContent = `${found.length} match${found.length === 1 ? "" : "es"}`;
    if (list === false) return;
    $("#search-results").innerHTML = found.slice(0, 200).map((n) =>
      `<li class="result" data-name="${esc(n.name)}" title="${esc(n.module)}">%${esc(n.name)} ` +
      `<span class="kind">${esc(n.kind)} ${esc(shortTarget(n))}</span></li>`).join("") +
      (found.length > 200 ? `<li class="more">${found.length - 200} more\u2026</li>` : "");
  }

  // ------------------------------------------------------------------ passes
  function fillModuleFilter(P) {
    const counts = new Map();
    for (const n of P.graph.nodes) {
      if (!n.module) continue;
      const parts = n.module.split(".");
      for (let j = 1; j <= parts.length; j++) {
        const p = parts.slice(0, j).join(".");
        counts.set(p, (counts.get(p) || 0) + 1);
      }
    }
    const sel = $("#module-filter");
    sel.innerHTML = `<option value="">(all)</option>` + [...counts.keys()].sort().map((p) =>
      `<option value="${esc(p)}">${esc(p)} (${counts.get(p)})</option>`).join("");
    if (!counts.has(state.filter)) state.filter = "";
    sel.value = state.filter;
  }

  function selectPass(k, nodeName) {
    const P = state.P = decodePass(k);
    state.k = k; state.collapsed.clear(); state.expanded.clear();
    document.querySelectorAll("li.pass").forEach((li) => li.classList.toggle("active", +li.dataset.k === k));
    $("#pass-title").textContent = `${P.meta.stage} / ${P.meta.stem}  (${P.meta.nodes} nodes, ` +
      `${P.meta.added} added, ${P.meta.changed} changed)`;
    fillModuleFilter(P);
    state.depth = chooseDepth(P);
    $("#collapse-depth").value = String(state.depth);
    renderDiff(); renderListing(); renderGraph();
    applySearch();
    const name = nodeName || state.sel;
    if (name && P.graph.byName.has(name)) reveal(name); else { state.sel = null; clearPanel(); writeHash(); }
  }

  function writeHash() {
    const m = META.passes[state.k];
    const h = "#" + [m.stage, m.stem].concat(state.sel ? [state.sel] : []).map(encodeURIComponent).join("/");
    if (location.hash !== h) history.replaceState(null, "", h);
  }

  function passFromHash() {
    const parts = location.hash.slice(1).split("/").map(decodeURIComponent);
    const k = META.passes.findIndex((m) => m.stage === parts[0] && m.stem === parts[1]);
    return k < 0 ? null : { k, node: parts[2] || null };
  }

  function defaultPass() {
    const first = META.passes.length ? META.passes[0].stage : null;
    let k = 0;
    META.passes.forEach((m, j) => { if (m.stage === first) k = j; });
    return k;
  }

  // ------------------------------------------------------------------ events
  function bind() {
    $("#passes").addEventListener("click", (ev) => {
      const li = ev.target.closest("li.pass");
      if (li) selectPass(+li.dataset.k);
    });
    $("#graph").addEventListener("click", (ev) => {
      const g = ev.target.closest("g.node");
      if (!g) return;
      if (g.dataset.group !== undefined) openGroup(g.dataset.group); else select(g.dataset.name, false);
    });
    const onNav = (ev) => {
      const el = ev.target.closest("[data-name]");
      if (el) reveal(el.dataset.name);
    };
    $("#search-results").addEventListener("click", onNav);
    $("#node-panel").addEventListener("click", (ev) => {
      const link = ev.target.closest("a.collapse");
      if (link) collapseModule(link.dataset.module); else if (ev.target.closest("a.nav")) onNav(ev);
    });
    $("#diff").addEventListener("click", onNav);
    $("#listing").addEventListener("click", onNav);
    $("#search").addEventListener("input", (ev) => { state.query = ev.target.value; applySearch(); });
    $("#search").addEventListener("keydown", (ev) => {
      const first = $("#search-results li.result");
      if (ev.key === "Enter" && first) reveal(first.dataset.name);
      if (ev.key === "Escape") { ev.target.value = ""; state.query = ""; applySearch(); }
    });
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "/" && document.activeElement !== $("#search")) { ev.preventDefault(); $("#search").focus(); }
    });
    $("#show-constants").addEventListener("change", (ev) => { state.showConst = ev.target.checked; renderGraph(); });
    $("#collapse-depth").addEventListener("change", (ev) => {
      state.depth = +ev.target.value; state.collapsed.clear(); state.expanded.clear(); renderGraph();
    });
    $("#module-filter").addEventListener("change", (ev) => { state.filter = ev.target.value; renderGraph(); });
    $("#expand-all").addEventListener("click", () => {
      state.depth = 0; state.collapsed.clear(); state.expanded.clear();
      $("#collapse-depth").value = "0"; renderGraph();
    });
    $("#zoom-in").addEventListener("click", () => { state.zoom = Math.min(2, state.zoom * 1.25); applyZoom(); });
    $("#zoom-out").addEventListener("click", () => { state.zoom = Math.max(0.05, state.zoom / 1.25); applyZoom(); });
    $("#zoom-fit").addEventListener("click", () => {
      state.zoom = Math.min(1, $("#graph-wrap").clientWidth / state.view.width); applyZoom();
    });
    document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => {
      showTab(b.dataset.tab); markLines(state.sel);
    }));
  }

  bind();
  if (META.passes.length) {
    const start = passFromHash();
    selectPass(start ? start.k : defaultPass(), start ? start.node : null);
  }
  document.body.dataset.ready = "1";
})();
"""
