"""One offline HTML page over a dump directory: every pass as a drawing, its listing and diff.

The text dumps (``NNN_<pass>.txt`` / ``.diff``) answer "what changed", but on a graph of a
thousand nodes it is hard to see *where*: which edges got int8, which nodes a pass added,
which backend rule claimed a conv and which source line it came from.
:func:`write_report` turns the JSON dumps (``dump_dir/<stage>/index.json`` and
``NNN_<pass>.json``, written by :mod:`qgraph.core.dump`) into ``dump_dir/index.html``:

- a list of the stages (``prepare_qat``, ``prepare_ptq``, ``convert``) and their passes in
  order, with their seconds and node counts from ``index.json``;
- for the selected pass a layered top-to-bottom drawing (layer = longest path from the
  inputs, order inside a layer = graph order), edges coloured by the dtype they carry
  (int8, uint8, 4-bit values stored in int8, int32, float), quantizer / quantize /
  dequantize nodes drawn with their own shapes, constants hidden unless asked for, the
  nodes this pass added or changed outlined;
- the listing and the diff to the previous pass, added and removed lines highlighted;
- a side panel (``#node-panel``) for the clicked node: target, value, specs and qparams
  group, rule, module and stack trace;
- a search box and module groups (collapse by depth, click a group to open it, or show one
  module only), so that vit_b_16 (~1000 nodes a pass) stays usable.

Everything is read from fields of the JSON dumps: an edge's colour from its ``dtype``,
``quant_min`` and ``quant_max``; the listing from each node's ``line`` and ``name``; the
diff is computed here from two passes' listings, so that each of its lines knows its node.
A pass whose JSON is missing or of another format version is shown from its ``.txt`` as
text only.

The page is one file that works offline: CSS, JS and data are inline, nothing is fetched.
Its HTML, CSS and JS are package data (``qgraph/tools/report_assets/``), linted as what
they are. To keep the page small every string (listing lines, stack-trace lines, specs) is
stored once in a shared table and passes refer to it by index; a pass whose graph equals
the previous one refers to it instead of repeating it. The browser decodes and draws only
the pass that is selected.
"""

from __future__ import annotations

import difflib
import html
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Iterable

from qgraph.core.dump_format import INDEX_JSON, INDEX_SCHEMA, PASS_SCHEMA
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
    "quant",
    "group",
    "quantizer",
    "quantizer_class",
)
"""Per-node string fields, in the order the page decodes them."""

ASSETS = ("report.html", "report.css", "report.js")
"""The page's template, style sheet and script: package data in ``qgraph/tools/report_assets/``."""

_STEM = re.compile(r"^(\d{3})_(.+)$")
"""A pass file's name stem, ``003_annotate``: read only where a stage has no ``index.json``."""
_INT_DTYPES = ("int8", "uint8", "int32")
_DIFF_TAGS = {"context": 0, "added": 1, "removed": 2, "header": 3, "hunk": 4}


# ---------------------------------------------------------------------------- edge dtypes


def edge_class(fields: dict) -> str:
    """The colour class (one of :data:`EDGE_CLASSES`) of an edge's ``dtype``, ``quant_min``
    and ``quant_max`` fields.

    A quantized edge is ``int4`` when its range holds at most 16 values, else its dtype
    (``quant`` for an integer dtype without a colour of its own); an edge without a range is
    ``int8`` / ``uint8`` / ``int32`` when its value has that dtype, else ``float``.
    """
    dtype, low, high = fields.get("dtype"), fields.get("quant_min"), fields.get("quant_max")
    if low is not None and high is not None:
        if high - low <= 15:
            return "int4"
        return dtype if dtype in _INT_DTYPES else "quant"
    return dtype if dtype in _INT_DTYPES else "float"


# ---------------------------------------------------------------------------- reading dumps


@dataclass
class PassDump:
    """One pass of one stage as read from its files."""

    stage: str
    stem: str
    name: str
    modified: bool | None = None
    seconds: float | None = None
    record: dict | None = None
    """The pass JSON; None when the pass has only its text dump (or a JSON of another version)."""
    listing: list[tuple[str, str | None]] = field(default_factory=list)
    """``(line, node name)`` per listing line; the name is None for a text-only pass."""


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _index_entries(stage_dir: Path) -> list[dict]:
    """The stage's passes in order: from ``index.json``, else from the pass file names."""
    index = _read_json(stage_dir / INDEX_JSON)
    if index is not None and index.get("schema") == INDEX_SCHEMA:
        return list(index["passes"])
    stems = sorted({p.stem for p in stage_dir.glob("[0-9][0-9][0-9]_*") if p.suffix in (".json", ".txt")})
    return [{"stem": s, "pass": m.group(2)} for s in stems if (m := _STEM.match(s))]


def _stage_dirs(dump_dir: Path) -> list[Path]:
    """Stage folders holding pass dumps, in pipeline order; ``dump_dir`` itself if it is one."""
    if _index_entries(dump_dir):
        return [dump_dir]
    dirs = [d for d in dump_dir.iterdir() if d.is_dir() and _index_entries(d)]
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    return sorted(dirs, key=lambda d: (rank.get(d.name, len(rank)), d.name))


def read_stage(stage_dir: Path) -> list[PassDump]:
    """Every pass of one stage folder, in order."""
    passes = []
    for entry in _index_entries(stage_dir):
        stem = entry["stem"]
        record = _read_json(stage_dir / f"{stem}.json")
        if record is not None and record.get("schema") != PASS_SCHEMA:
            record = None
        dump = PassDump(stage_dir.name, stem, entry["pass"], entry.get("modified"), entry.get("seconds"), record)
        if record is not None:
            dump.modified = record["modified"]
            dump.listing = [(n["line"], n["name"]) for n in record["nodes"]]
        elif (stage_dir / f"{stem}.txt").exists():
            text = (stage_dir / f"{stem}.txt").read_text(encoding="utf-8", errors="replace")
            dump.listing = [(line, None) for line in text.splitlines()]
        passes.append(dump)
    return passes


# ---------------------------------------------------------------------------- diff


def listing_diff(before: PassDump, after: PassDump) -> list[tuple[str, str, str | None]]:
    """``(tag, text, node name)`` lines of the unified diff (one line of context) from
    ``before``'s listing to ``after``'s; tags are the keys of ``_DIFF_TAGS``.

    The same diff as the ``.diff`` file, but computed from the listings' lines so that every
    line knows which node it lists.
    """
    old = [line for line, _ in before.listing]
    new = [line for line, _ in after.listing]
    out: list[tuple[str, str, str | None]] = []
    for group in difflib.SequenceMatcher(None, old, new).get_grouped_opcodes(1):
        if not out:
            out += [("header", f"--- {before.stem}.txt", None), ("header", f"+++ {after.stem}.txt", None)]
        first, last = group[0], group[-1]
        out.append(("hunk", f"@@ -{_hunk_range(first[1], last[2])} +{_hunk_range(first[3], last[4])} @@", None))
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                out += [("context", *after.listing[j]) for j in range(j1, j2)]
                continue
            out += [("removed", *before.listing[i]) for i in range(i1, i2)]
            out += [("added", *after.listing[j]) for j in range(j1, j2)]
    return out


def _hunk_range(start: int, stop: int) -> str:
    """A unified diff hunk's range, as :func:`difflib.unified_diff` writes it."""
    length = stop - start
    if length == 1:
        return str(start + 1)
    return f"{start + 1 if length else start},{length}"


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


def _text(fields: dict | None) -> str | None:
    return fields.get("text") if fields else None


def _node_strings(node: dict) -> dict[str, str | None]:
    """The :data:`NODE_FIELDS` of one node record, as the page shows them."""
    quantizer = node.get("quantizer")
    return {
        **{f: node.get(f) for f in ("name", "op", "target", "kind", "value", "line", "module", "module_type", "rule")},
        "output_spec": _text(node.get("output_spec")),
        "quant": _text(node.get("spec")),
        "group": node.get("group"),
        "quantizer": _text(quantizer),
        "quantizer_class": quantizer.get("class") if quantizer else None,
    }


def _encode_node(node: dict, strings: StringTable) -> list:
    shown = _node_strings(node)
    fields = [strings(shown[f] or None) for f in NODE_FIELDS]
    stack = node.get("stack_trace") or ""
    inputs = [sid for name, spec in node["input_specs"].items() for sid in (strings(name), strings(_text(spec)))]
    return fields + [strings.many(stack.split("\n")) if stack else [], inputs]


def _encode_edges(record: dict) -> list[int]:
    """Flat ``[src, dst, class, ...]`` with node positions and :data:`EDGE_CLASSES` indices."""
    position = {n["name"]: i for i, n in enumerate(record["nodes"])}
    flat: list[int] = []
    for edge in record["edges"]:
        if edge["src"] in position and edge["dst"] in position:
            flat += [position[edge["src"]], position[edge["dst"]], EDGE_CLASSES.index(edge_class(edge))]
    return flat


def _changes(record: dict | None, previous: dict | None) -> tuple[list[int], list[int]]:
    """Positions of the nodes this pass added, and of those whose listing line changed."""
    if record is None or previous is None:
        return [], []
    before = {n["name"]: n["line"] for n in previous["nodes"]}
    added = [i for i, n in enumerate(record["nodes"]) if n["name"] not in before]
    changed = [i for i, n in enumerate(record["nodes"]) if n["name"] in before and before[n["name"]] != n["line"]]
    return added, changed


def encode_pass(dump: PassDump, previous: PassDump | None, strings: StringTable) -> dict:
    """One pass as the page reads it: nodes and edges as indices, listing, diff, changes.

    ``previous`` is the pass before it in the same stage (None for the first).
    """
    record = dump.record or {"nodes": [], "edges": []}
    added, changed = _changes(dump.record, previous.record if previous else None)
    diff = None
    if previous is not None:
        lines = listing_diff(previous, dump)
        diff = [x for tag, text, name in lines for x in (_DIFF_TAGS[tag], strings(text), strings(name))]
    return {
        "nodes": [_encode_node(n, strings) for n in record["nodes"]],
        "edges": _encode_edges(record),
        "listing": [x for line, name in dump.listing for x in (strings(line), strings(name))],
        "diff": diff,
        "added": added,
        "changed": changed,
    }


def _collect(dump_dir: Path, strings: StringTable) -> tuple[list[dict], list[dict]]:
    """(pass metadata for the page, encoded pass data) over all stages, in order."""
    metas, datas = [], []
    for stage_dir in _stage_dirs(dump_dir):
        previous, previous_data = None, None
        for dump in read_stage(stage_dir):
            data = encode_pass(dump, previous, strings)
            if previous_data is not None and _same_graph(data, previous_data):
                data = {**data, "nodes": None, "edges": None, "same_as": len(datas) - 1}
            metas.append(_pass_meta(dump, data))
            datas.append(data)
            previous, previous_data = dump, (data if data.get("same_as") is None else previous_data)
    return metas, datas


def _same_graph(data: dict, previous: dict) -> bool:
    return data["nodes"] == previous["nodes"] and data["edges"] == previous["edges"]


def _pass_meta(dump: PassDump, data: dict) -> dict:
    return {
        "stage": dump.stage,
        "stem": dump.stem,
        "pass": dump.name,
        "modified": dump.modified,
        "seconds": dump.seconds,
        "nodes": len(dump.record["nodes"]) if dump.record else 0,
        "added": len(data["added"]),
        "changed": len(data["changed"]),
    }


# ---------------------------------------------------------------------------- HTML


def asset(name: str) -> str:
    """The text of one of :data:`ASSETS` (package data, read with :mod:`importlib.resources`)."""
    return (resources.files("qgraph.tools") / "report_assets" / name).read_text(encoding="utf-8")


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
    seconds = f"{meta['seconds']:.3f}s" if meta["seconds"] is not None else ""
    title = f"{meta['nodes']} nodes, {meta['added']} added, {meta['changed']} changed {seconds}".strip()
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
    # substitute() makes one pass over the template: data never has a placeholder filled in.
    page = Template(asset("report.html")).substitute(
        title=html.escape(title),
        css=asset("report.css"),
        passes=_pass_list_html(metas),
        data="\n".join(scripts),
        js=asset("report.js"),
    )
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
