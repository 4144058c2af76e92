"""``qgraph.tools.check``: the same inputs through every form of a quantized model, layer by layer.

Why: a user trains a fake-quant model and ships a ``.pte`` or an ``.onnx``; between the two
sit ``convert``, the exporter and a runtime's integer kernels, each of which may round
differently. End to end the outputs differ by a few steps and nobody can say where. Here
every form runs on the same inputs and every quantized tensor is compared, so the first
layer where two forms part is named.

Forms (``targets``):

``fake_quant``  the prepared model (QAT or PTQ) in eval mode; every observer and
                fake-quant module fake-quantizes with its current qparams (what ``convert``
                freezes), an int32 bias quantizer too;
``converted``   the ``convert`` output: float ops between quantize / dequantize;
``reference``   :func:`qgraph.lower` of it: integer kernels with the target's rounding;
``pte``         the ``.pte`` (ExecuTorch, XNNPACK delegate) written by :func:`qgraph.export_pte`;
``onnx``        the ``.onnx`` written by :func:`qgraph.export_onnx`, run in ONNX Runtime.

**Places.** Every ``quantize_per_tensor`` of the converted graph is a place. Each form's
value there is read as a float on the grid its consumers use — the qparams of the
place's dequantize — so that the difference of two forms divided by that scale is a
count of quantization steps (an integer for the integer forms). The runtimes give their
values as extra outputs: the converted graph returns every quantized tensor before it is
exported, which changes none of the kernels. A uint8 tensor a runtime holds as int8 (the
``.pte`` of an x86 model) is shifted back by 128.

**Isolated differences.** A deep network amplifies a one-step difference, so cumulative
differences grow with depth even when every kernel is right. For each runtime — and for
the converted graph, whose float ops stand in for integer kernels — the reference kernels
are also fed *that form's own* integer inputs, layer by layer; their difference to the
form's output (``isolated``) is the kernel's own rounding error: 0 where the reference
reproduces a runtime bit for bit, at most one step (at ties) against the float graph.

**Outputs.** Each graph output is compared in steps of its last dequantize (or as a plain
absolute difference when the output is not quantized).

The first place where any pair of forms differs by more than ``tolerance`` steps is
:attr:`CheckReport.first_disagreement`. Nothing passed in is modified.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree
from tabulate import tabulate
from tqdm.auto import tqdm

from qgraph.api.capture import as_args
from qgraph.api.export import export_onnx, export_pte, load_onnx, load_pte
from qgraph.api.lower import TARGETS, default_target, lower
from qgraph.api.modes import eval_mode
from qgraph.core.errors import ConfigError
from qgraph.core.graph import copy_graph_module, is_op, module_path
from qgraph.core.meta import REFERENCE_KEY
from qgraph.observers.base import DerivedQuantizer, FakeQuantize, Observer
from qgraph.ops.qdq import qd
from qgraph.quant.qparams import fake_quantize

FORMS = ("fake_quant", "converted", "reference", "pte", "onnx")
RUNTIME_OF_FORM = {"pte": "xnnpack", "onnx": "onnxruntime"}
"""Whose arithmetic a runtime form computes: the reference rules its isolated check uses."""

__all__ = ["CheckReport", "CheckRow", "OutputRow", "check", "FORMS"]


# -- the report ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckRow:
    """One quantized tensor: the largest difference between each pair of forms, in steps."""

    index: int
    """Position among the quantized tensors, in graph order."""
    name: str
    """The quantize node of the converted graph."""
    pattern: str
    """The integer pattern that computes it (``conv_relu``, ``add``, ``quantize``, ...)."""
    module: str
    """Module path of the pattern's anchor op."""
    shape: tuple[int, ...]
    scale: float
    """The quantization step the differences are counted in."""
    steps: dict[tuple[str, str], float]
    """``(form_a, form_b) → max |a - b| / scale`` over all elements."""
    identical: dict[tuple[str, str], float]
    """``(form_a, form_b) →`` share of elements within half a step."""
    isolated: dict[str, float] = field(default_factory=dict)
    """``form →`` max steps between that form and the reference kernel fed the form's own
    integer inputs (runtimes, and ``converted``: the float op against the integer kernel)."""
    isolated_identical: dict[str, float] = field(default_factory=dict)
    """``form →`` share of elements where that form and the fed reference kernel agree."""

    @property
    def worst(self) -> float:
        return max(self.steps.values(), default=0.0)


@dataclass(frozen=True)
class OutputRow:
    """One graph output: differences in output steps (or absolute when not quantized)."""

    index: int
    scale: Optional[float]
    steps: dict[tuple[str, str], float]
    identical: dict[tuple[str, str], float]


@dataclass
class CheckReport:
    """What :func:`check` measured; ``str(report)`` is the table it prints."""

    forms: tuple[str, ...]
    rows: list[CheckRow]
    outputs: list[OutputRow]
    tolerance: float
    target: str
    """The reference's rounding rules (a :func:`qgraph.lower` target)."""

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(itertools.combinations(self.forms, 2))

    @property
    def first_disagreement(self) -> Optional[CheckRow]:
        """The first quantized tensor where some pair of forms differs by more than ``tolerance`` steps."""
        return next((r for r in self.rows if r.worst > self.tolerance + 1e-3), None)

    def disagreeing_pairs(self, row: CheckRow) -> list[tuple[str, str]]:
        return [p for p, s in row.steps.items() if s > self.tolerance + 1e-3]

    def __getitem__(self, name: str) -> CheckRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def isolated_by_pattern(self, form: str) -> dict[str, tuple[int, int, float]]:
        """``pattern → (layers, bit-exact layers, max isolated steps)`` of a runtime form or
        of ``converted``."""
        out: dict[str, list] = {}
        for row in self.rows:
            if form in row.isolated:
                entry = out.setdefault(row.pattern, [0, 0, 0.0])
                entry[0] += 1
                entry[1] += row.isolated[form] == 0
                entry[2] = max(entry[2], row.isolated[form])
        return {k: (a, b, c) for k, (a, b, c) in out.items()}

    @property
    def chain(self) -> list[tuple[str, str]]:
        """The pairs along the pipeline: each form against the one it was made from
        (fake-quant → converted → reference → each runtime)."""
        order = [f for f in ("fake_quant", "converted", "reference") if f in self.forms]
        pairs = list(zip(order, order[1:]))
        base = order[-1]
        return pairs + [(base, f) for f in self.forms if f in RUNTIME_OF_FORM]

    def to_text(self, all_pairs: bool = False) -> str:
        """The table; by default the columns are the :attr:`chain` pairs (every pair with
        ``all_pairs=True``). The first disagreement always considers every pair."""
        pairs = self.pairs if all_pairs else self.chain
        runtimes = [f for f in ("converted", *RUNTIME_OF_FORM) if any(f in r.isolated for r in self.rows)]
        headers = ["#", "tensor", "pattern", "module"] + [f"{a}|{b}" for a, b in pairs]
        headers += [f"{f} isolated" for f in runtimes]
        first = self.first_disagreement
        body = []
        for r in self.rows:
            mark = " <" if first is not None and r.index == first.index else ""
            cells = [r.index, r.name + mark, r.pattern, r.module or "-"]
            cells += [_fmt(r.steps.get(p)) for p in pairs]
            cells += [_fmt(r.isolated.get(f)) for f in runtimes]
            body.append(cells)
        text = f"largest difference per quantized tensor, in steps of that tensor (reference: {self.target} rounding)\n"
        text += tabulate(body, headers=headers)
        out_rows = [[o.index, "steps" if o.scale else "abs"] + [_fmt(o.steps.get(p)) for p in pairs] for o in self.outputs]
        text += "\n\noutputs\n" + tabulate(out_rows, headers=["output", "unit"] + [f"{a}|{b}" for a, b in pairs])
        if first is None:
            text += f"\n\nall forms agree within {self.tolerance:g} step(s) at every quantized tensor"
        else:
            which = ", ".join(f"{a} vs {b} ({first.steps[(a, b)]:g} steps)" for a, b in self.disagreeing_pairs(first))
            text += f"\n\nfirst disagreement: #{first.index} {first.name} ({first.pattern}"
            text += f", module '{first.module}')" if first.module else ")"
            text += f": {which}"
        return text

    def __str__(self) -> str:
        return self.to_text()


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value - round(value)) < 1e-3 else f"{value:.2f}"


# -- places --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Place:
    name: str
    scale: float
    zero_point: int
    dtype: torch.dtype


def _places(gm: torch.fx.GraphModule) -> list[_Place]:
    places = []
    for node in gm.graph.nodes:
        if not is_op(node, (qd.quantize_per_tensor.default,)) or not isinstance(node.args[1], (float, int)):
            continue
        dq = next((u for u in node.users if is_op(u, (qd.dequantize_per_tensor.default,))), None)
        scale, zp = (dq.args[1], dq.args[2]) if dq is not None else (node.args[1], node.args[2])
        places.append(_Place(node.name, float(scale), int(zp), node.args[5]))
    return places


def _with_quantized_outputs(gm: torch.fx.GraphModule, names: Sequence[str]) -> tuple[torch.fx.GraphModule, int]:
    """A copy of ``gm`` that also returns the tensors of the quantize nodes ``names``."""
    gm = copy_graph_module(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat, _ = pytree.tree_flatten(out.args[0])
    out.args = (tuple(flat) + tuple(nodes[n] for n in names),)
    codegen = gm.graph._codegen
    if getattr(codegen, "pytree_info", None) is not None:
        spec = pytree.tree_flatten(tuple(range(len(out.args[0]))))[1]
        codegen.pytree_info = codegen.pytree_info._replace(out_spec=spec)
    gm.graph.lint()
    gm.recompile()
    return gm, len(flat)


def _flat_outputs(value: Any) -> list[torch.Tensor]:
    return [v for v in pytree.tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


def _as_codes(value: torch.Tensor, place: _Place) -> torch.Tensor:
    """Integer codes of ``place``'s dtype (a uint8 tensor a runtime held as int8 shifted back)."""
    codes = value.to(torch.int64)
    if value.dtype != place.dtype and not value.dtype.is_floating_point:
        codes = codes + (torch.iinfo(place.dtype).min - torch.iinfo(value.dtype).min)
    return codes


def _dequantize(codes: torch.Tensor, place: _Place) -> torch.Tensor:
    return (codes.to(torch.float64) - place.zero_point) * place.scale


# -- running each form -----------------------------------------------------------------------
@dataclass
class _FormValues:
    places: dict[str, torch.Tensor]
    """place name → float value on the place's grid (float64)."""
    outputs: list[torch.Tensor]


class _Recorder(torch.fx.Interpreter):
    """Runs a graph and keeps the values of the nodes in ``wanted`` (node → key)."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: dict[torch.fx.Node, str], simulate: bool = False):
        super().__init__(gm)
        self.wanted = wanted
        self.simulate = simulate
        self.values: dict[str, torch.Tensor] = {}

    def call_module(self, target, args, kwargs) -> Any:
        mod = self.fetch_attr(target)
        if self.simulate and isinstance(mod, (Observer, FakeQuantize)):
            return fake_quantize(args[0], *mod.qparams(), mod.spec)
        if self.simulate and isinstance(mod, DerivedQuantizer) and mod.has_range:
            scale, zp = mod.qparams()
            scale = scale.expand(args[0].shape[0]) if scale.numel() == 1 else scale
            return torch.fake_quantize_per_channel_affine(
                args[0], scale, zp.expand_as(scale), 0, mod.quant_min, mod.quant_max
            )
        return super().call_module(target, args, kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        key = self.wanted.get(n)
        if key is not None and isinstance(out, torch.Tensor):
            self.values[key] = out.detach().clone()
        return out


def _run_converted(quantized: torch.fx.GraphModule, args: tuple, places: list[_Place]):
    gm = eval_mode(copy_graph_module(quantized))
    nodes = {n.name: n for n in gm.graph.nodes}
    rec = _Recorder(gm, {nodes[p.name]: p.name for p in places})
    outputs = _flat_outputs(rec.run(*args))
    codes = {p.name: _as_codes(rec.values[p.name], p) for p in places}
    return _FormValues({p.name: _dequantize(codes[p.name], p) for p in places}, outputs), codes


def _run_reference(lowered: torch.fx.GraphModule, args: tuple, places: list[_Place]) -> _FormValues:
    wanted = {n: n.meta[REFERENCE_KEY].quantize for n in lowered.graph.nodes if REFERENCE_KEY in n.meta}
    rec = _Recorder(lowered, wanted)
    outputs = _flat_outputs(rec.run(*args))
    by_name = {p.name: p for p in places}
    values = {k: _dequantize(_as_codes(v, by_name[k]), by_name[k]) for k, v in rec.values.items() if k in by_name}
    return _FormValues(values, outputs)


def _quantizer_source(q: torch.fx.Node) -> Optional[str]:
    """Name of the prepared-model quantizer node a converted quantize op was made from."""
    sources = q.meta.get("from_node") or []
    return sources[-1].name if sources else None


def _run_fake_quant(prepared: torch.fx.GraphModule, quantized: torch.fx.GraphModule, args, places) -> _FormValues:
    gm = eval_mode(copy_graph_module(prepared))
    nodes = {n.name: n for n in gm.graph.nodes}
    qnodes = {n.name: n for n in quantized.graph.nodes}
    wanted = {}
    for p in places:
        source = nodes.get(_quantizer_source(qnodes[p.name]) or "")
        if source is not None and source.op == "call_module":
            wanted[source] = p.name
    rec = _Recorder(gm, wanted, simulate=True)
    outputs = _flat_outputs(rec.run(*args))
    return _FormValues({k: v.to(torch.float64) for k, v in rec.values.items()}, outputs)


def _run_runtime(form: str, quantized, args, places, workdir: str) -> tuple[_FormValues, dict[str, torch.Tensor]]:
    """Export with every quantized tensor as an extra output, run, and split the results."""

    names = [p.name for p in places]
    exposed, n_out = _with_quantized_outputs(quantized, names)
    path = os.path.join(workdir, f"check.{form}")
    if form == "pte":
        export_pte(exposed, args, path)
        results = load_pte(path)(*args)
    else:
        export_onnx(exposed, args, path)
        results = load_onnx(path)(*args)
    results = list(results) if isinstance(results, (tuple, list)) else [results]
    raw = dict(zip(names, results[n_out:]))
    codes = {p.name: _as_codes(raw[p.name], p) for p in places}
    values = {p.name: _dequantize(codes[p.name], p) for p in places}
    return _FormValues(values, results[:n_out]), codes


def _isolated(
    lowered: torch.fx.GraphModule, args: tuple, codes: dict[str, torch.Tensor], places
) -> dict[str, tuple[float, float]]:
    """Per place: ``(max steps, identical share)`` between a form and the reference kernel fed
    that form's integer inputs.

    The lowered graph runs node by node; after each integer node its own output is compared
    with the runtime's and then *replaced* by the runtime's, so every later kernel starts
    from exactly what the runtime computed.
    """
    by_name = {p.name: p for p in places}
    env: dict[torch.fx.Node, Any] = {}
    out: dict[str, tuple[float, float]] = {}
    it = iter(args)
    for n in lowered.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(it)
            continue
        if n.op == "output":
            break
        if n.op == "get_attr":
            env[n] = torch.fx.Interpreter(lowered).fetch_attr(str(n.target))
            continue
        if n.op == "call_module":
            continue  # only the export guard is left in a converted graph
        a = torch.fx.node.map_arg(n.args, lambda x: env[x])
        k = torch.fx.node.map_arg(n.kwargs, lambda x: env[x])
        value = n.target(*a, **k)
        rec = n.meta.get(REFERENCE_KEY)
        if rec is not None and rec.quantize in codes:
            place = by_name[rec.quantize]
            theirs = codes[rec.quantize]
            diff = (_as_codes(value, place) - theirs).abs()
            out[rec.quantize] = (float(diff.max()), float((diff == 0).double().mean())) if diff.numel() else (0.0, 1.0)
            value = (theirs - (torch.iinfo(place.dtype).min - torch.iinfo(value.dtype).min)).to(value.dtype)
        env[n] = value
    return out


# -- the entry point -------------------------------------------------------------------------
def _diff(a: torch.Tensor, b: torch.Tensor, scale: Optional[float]) -> tuple[float, float]:
    a, b = a.to(torch.float64), b.to(torch.float64)
    if a.shape != b.shape:
        raise ConfigError(f"check: two forms gave shapes {tuple(a.shape)} and {tuple(b.shape)} for one tensor")
    d = (a - b).abs() / (scale if scale else 1.0)
    if d.numel() == 0:
        return 0.0, 1.0
    steps = float(d.max())
    return round(steps, 3), float((d < 0.5).double().mean()) if scale else float((d == 0).double().mean())


def _output_scales(quantized: torch.fx.GraphModule) -> list[Optional[float]]:
    out = next(n for n in quantized.graph.nodes if n.op == "output")
    scales = []
    for node in pytree.tree_flatten(out.args[0])[0]:
        if is_op(node, (qd.dequantize_per_tensor.default,)) and isinstance(node.args[1], (float, int)):
            scales.append(float(node.args[1]))
        else:
            scales.append(None)
    return scales


def check(
    model: Optional[torch.nn.Module],
    quantized: torch.fx.GraphModule,
    example_inputs: Any,
    targets: Sequence[str] = ("fake_quant", "reference", "pte", "onnx"),
    *,
    target: Optional[str] = None,
    tolerance: float = 0.0,
    verbose: bool = True,
    workdir: str | os.PathLike | None = None,
    progress: Optional[bool] = None,
) -> CheckReport:
    """Run ``example_inputs`` through every form in ``targets`` and compare them tensor by tensor.

    ``model`` is the prepared model (:func:`qgraph.prepare_qat` / :func:`qgraph.prepare_ptq`,
    trained or calibrated) that ``quantized`` was converted from; it is needed only for
    ``"fake_quant"``. ``quantized`` is what :func:`qgraph.convert` returned; ``"converted"``
    is always among the forms. ``target`` picks the reference's rounding (default: the
    runtime of the backend, see :func:`qgraph.lower`). ``.pte`` and ``.onnx`` files go to
    ``workdir`` (a temporary directory by default). The table is printed when ``verbose``;
    the :class:`CheckReport` is returned either way. A progress bar names the form being run
    (exporting and running ``.pte`` / ``.onnx`` takes seconds): on a terminal by default,
    always with ``progress=True``, never with ``progress=False``; it is cleared before the
    table prints.
    """
    if not isinstance(quantized, torch.fx.GraphModule) or "qgraph_converted" not in quantized.meta:
        raise ConfigError("check() takes the model returned by qgraph.convert as `quantized`")
    unknown = [t for t in targets if t not in FORMS]
    if unknown:
        raise ConfigError(f"check(targets=...): unknown form(s) {unknown}; choose from {FORMS}")
    forms = tuple(f for f in FORMS if f in targets or f == "converted")
    if "fake_quant" in forms and not (isinstance(model, torch.fx.GraphModule) and "qgraph_prepared" in model.meta):
        raise ConfigError(
            "check(): the 'fake_quant' form needs `model` to be the prepared model that `quantized` "
            "was converted from (what qgraph.prepare_qat / prepare_ptq returned); pass it, or drop "
            "'fake_quant' from targets"
        )
    target = default_target(quantized) if target is None else target
    if target not in TARGETS:
        raise ConfigError(f"check(target={target!r}): choose one of {sorted(TARGETS)}")
    args = as_args(example_inputs)
    places = _places(quantized)
    values: dict[str, _FormValues] = {}
    isolated: dict[str, dict[str, tuple[float, float]]] = {}
    disable = None if progress is None else not progress
    bar = tqdm(total=len(forms), desc="check", unit="form", leave=False, disable=disable)
    with bar, torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        folder = str(workdir) if workdir is not None else tmp
        os.makedirs(folder, exist_ok=True)
        bar.set_postfix_str("converted")
        values["converted"], converted_codes = _run_converted(quantized, args, places)
        bar.update()
        if "fake_quant" in forms:
            bar.set_postfix_str("fake_quant")
            values["fake_quant"] = _run_fake_quant(model, quantized, args, places)
            bar.update()
        lowered = {target: lower(quantized, target)}
        if "reference" in forms:
            bar.set_postfix_str("reference")
            isolated["converted"] = _isolated(lowered[target], args, converted_codes, places)
            values["reference"] = _run_reference(lowered[target], args, places)
            bar.update()
        for form in ("pte", "onnx"):
            if form not in forms:
                continue
            bar.set_postfix_str(f"export and run .{form}")
            values[form], codes = _run_runtime(form, quantized, args, places, folder)
            rules = RUNTIME_OF_FORM[form]
            ref = lowered[target] if TARGETS[target] == rules else lower(quantized, rules)
            isolated[form] = _isolated(ref, args, codes, places)
            bar.update()
    report = _report(forms, places, values, isolated, _output_scales(quantized), quantized, lowered[target], tolerance, target)
    if verbose:
        print(report)
    return report


def _report(forms, places, values, isolated, out_scales, quantized, lowered, tolerance, target) -> CheckReport:
    patterns = {n.meta[REFERENCE_KEY].quantize: n for n in lowered.graph.nodes if REFERENCE_KEY in n.meta}
    rows = []
    for i, p in enumerate(places):
        present = [f for f in forms if p.name in values[f].places]
        steps, identical = {}, {}
        for a, b in itertools.combinations(present, 2):
            steps[(a, b)], identical[(a, b)] = _diff(values[a].places[p.name], values[b].places[p.name], p.scale)
        ref_node = patterns.get(p.name)
        rec = ref_node.meta[REFERENCE_KEY] if ref_node is not None else None
        module = module_path(ref_node) if ref_node is not None else ""
        shape = tuple(values["converted"].places[p.name].shape)
        iso = {f: isolated[f][p.name][0] for f in isolated if p.name in isolated[f]}
        iso_same = {f: isolated[f][p.name][1] for f in isolated if p.name in isolated[f]}
        rows.append(
            CheckRow(i, p.name, rec.pattern if rec else "float", module, shape, p.scale, steps, identical, iso, iso_same)
        )
    outputs = []
    for j, scale in enumerate(out_scales):
        steps, identical = {}, {}
        for a, b in itertools.combinations(forms, 2):
            if j < len(values[a].outputs) and j < len(values[b].outputs):
                steps[(a, b)], identical[(a, b)] = _diff(values[a].outputs[j], values[b].outputs[j], scale)
        outputs.append(OutputRow(j, scale, steps, identical))
    return CheckReport(forms, rows, outputs, tolerance, target)

