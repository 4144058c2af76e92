"""Per-layer quantization error: where in the network does int8 lose the signal?

Why: a quantized model that is less accurate than its float original rarely suffers
everywhere. Usually one or two quantized points have a bad range — an outlier-driven
observer whose steps are too coarse, or a range too narrow that clips — and everything
after them inherits the damage. Reading the end-to-end accuracy cannot say which;
comparing every quantized activation with the float model's value at the same place can.

The metric is the signal-to-quantization-noise ratio in decibels, accumulated over every
element of every batch::

    SQNR = 10 * log10( sum(ref ** 2) / sum((ref - q) ** 2) )

``ref`` is the float model's activation, ``q`` the quantized model's. Sums (in float64)
run over all batches before the ratio, so a batch is weighted by its energy, not its
count. Each 6 dB is one bit: an int8 point whose range fits its data sits around
30-45 dB, a clipped or far too coarse one near 0 dB. No error gives ``inf``; a zero
reference with some error gives ``-inf``. Two SQNRs are reported per point:

* ``sqnr_db`` (*cumulative*): ``q`` is the quantized model's activation, so it includes the
  error of every quantized layer upstream (weights included) — what the model really
  computes at this place.
* ``isolated_sqnr_db``: ``q`` is the float activation quantized with this point's own
  qparams, ``fake_quant(ref)``: the error this point would add if everything upstream
  were exact. Damage spreads downstream in the cumulative SQNR (a collapsed activation
  makes the next layers collapse too), so ranking by it can blame an innocent layer;
  the isolated SQNR names the point whose range is wrong.

Rows are ranked by the isolated SQNR, then the cumulative one, then graph order — the
first row is the culprit; the cumulative column shows how far its damage reaches.

**Places.** A quantized point is an observer / fake-quant call (prepared graph; its
``node.meta['qgraph_quantizer']`` says which point) or a ``quantize_per_*`` op with its
dequantize users (converted graph). Its *producer* is the node before it (through earlier
quantizers), which passes never rename, so the float counterpart is the node of the same
name in ``qgraph.capture(model)``. Two rewrites make that node compute something else: PTQ
folds an eval-mode batch norm into the conv before it, and QAT's simulated BN (in eval
form, which is what is compared) drops the BN tail, so the conv's output *is* the BN's
output. When the float producer's only user is a batch norm the quantized graph no longer
has, the batch norm is the counterpart. Points on constants (weights) are left out;
:func:`plot_layer_histograms` shows them.

**Prepared graphs.** By default every observer and fake-quant module fake-quantizes with
its current qparams — exactly what ``convert`` will produce — without updating its range
(a PTQ observer otherwise passes values through, which would measure nothing).
``simulate_quantization=False`` passes them all through unchanged, which measures only what
the graph rewrites (BN folding) changed: every SQNR then is ``inf`` or float rounding.

Nothing the caller passes is modified: the quantized graph runs as a private copy in eval
mode under a :class:`torch.fx.Interpreter`, and the float model is captured (a copy).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import torch.fx
from tabulate import tabulate
from torch import nn
from tqdm.auto import tqdm

from qgraph.api.capture import as_args, capture
from qgraph.api.modes import eval_mode
from qgraph.core.errors import ConfigError
from qgraph.core.files import atomic_path
from qgraph.core.graph import copy_graph_module, get_constant, is_op, module_path, single_user
from qgraph.core.meta import ANNOTATION_KEY, QUANTIZER_KEY
from qgraph.core.opsets import BATCH_NORM_OPS, CHOOSE_QPARAMS_OPS, DEQUANTIZE_OPS, PER_CHANNEL_QDQ_OPS, QUANTIZE_OPS
from qgraph.observers.base import QUANTIZER_TYPES, DynamicQuantizer

__all__ = ["LayerError", "LayerErrorReport", "compare", "plot_layer_histograms", "sqnr_db"]


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """``10 * log10(signal / noise)``; ``inf`` without noise, ``-inf`` for noise on silence."""
    if math.isnan(signal_energy) or math.isnan(noise_energy):
        return math.nan
    if noise_energy == 0.0:
        return math.inf
    if signal_energy == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_energy / noise_energy)


# -- the report --------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerError:
    """One quantized point: its cumulative and isolated SQNR against the float model."""

    name: str
    """Node name of a quantized output, or ``"producer -> consumer"`` for a quantized input."""
    op: str
    """Backend rule of the pattern (``conv_relu``, ``add``, ...) or the ATen op when none."""
    module: str
    """Module path of the pattern's anchor (the conv of a fused conv + ReLU)."""
    sqnr_db: float
    """Float activation vs the quantized model's activation (errors from upstream included)."""
    isolated_sqnr_db: float
    """Float activation vs the same activation quantized with this point's qparams alone."""
    shape: tuple[int, ...]
    """Activation shape in the first batch."""
    float_node: str
    """Node of the float capture it was compared with (differs after BN folding)."""
    anchor: str
    """Anchor node of the pattern (the conv of a fused conv + ReLU)."""
    index: int
    """Position in the quantized graph: rows sort back into graph order with it."""


def _low_first(x: float) -> float:
    return -math.inf if math.isnan(x) else x  # NaN (a NaN activation) counts as worst


def _rank_key(row: LayerError) -> tuple[float, float, int]:
    return _low_first(row.isolated_sqnr_db), _low_first(row.sqnr_db), row.index


@dataclass
class LayerErrorReport:
    """SQNR of every quantized point, worst first (see the module docstring for the ranking)."""

    rows: list[LayerError]
    unmatched: dict[str, str]
    """Quantized points with no float counterpart, and why."""
    batches: int

    def __post_init__(self) -> None:
        self.rows = sorted(self.rows, key=_rank_key)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayerError]:
        return iter(self.rows)

    def __getitem__(self, name: str) -> LayerError:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no quantized point named {name!r}; names: {[r.name for r in self.rows]}")

    def worst(self, n: int = 5, by: str = "isolated_sqnr_db") -> list[LayerError]:
        """The ``n`` worst points by ``by`` (``"isolated_sqnr_db"`` or ``"sqnr_db"``)."""
        if by not in ("isolated_sqnr_db", "sqnr_db"):
            raise ValueError(f"by must be 'isolated_sqnr_db' or 'sqnr_db', got {by!r}")
        if by == "isolated_sqnr_db":
            return self.rows[:n]
        return sorted(self.rows, key=lambda r: (_low_first(r.sqnr_db), r.index))[:n]

    def in_graph_order(self) -> list[LayerError]:
        return sorted(self.rows, key=lambda r: r.index)

    def to_text(self, n: Optional[int] = None) -> str:
        """A table of the ``n`` worst points (all by default)."""
        rows = [
            [i, r.name, r.op, r.module, _fmt_db(r.isolated_sqnr_db), _fmt_db(r.sqnr_db), "x".join(map(str, r.shape))]
            for i, r in enumerate(self.rows[:n], start=1)
        ]
        headers = ["rank", "layer", "op", "module", "isolated SQNR dB", "SQNR dB", "shape"]
        text = f"{len(self.rows)} quantized points, {self.batches} batches, worst first\n"
        text += tabulate(rows, headers=headers, disable_numparse=True)
        if self.unmatched:
            text += "\nnot compared: " + "; ".join(f"{k} ({v})" for k, v in self.unmatched.items())
        return text

    def __str__(self) -> str:
        return self.to_text()

    def plot(self, path: str | os.PathLike, highlight: int = 1) -> Path:
        """Bar chart of the SQNR per point in graph order, the ``highlight`` worst in red (PNG)."""
        return _plot_report(self, Path(path), highlight)


def _fmt_db(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else str(x)


# -- quantization grids ------------------------------------------------------------------
@dataclass(frozen=True)
class _Grid:
    """``x ≈ (q - zero_point) * scale`` with ``q`` in ``[qmin, qmax]``; ``axis`` for per-channel."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: Optional[int] = None

    def _shaped(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return t.reshape(())
        shape = [1] * like.dim()
        shape[self.axis % like.dim()] = -1
        return t.reshape(shape)

    def bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest and largest representable value, broadcastable against ``like``."""
        scale = self._shaped(self.scale.float(), like)
        zp = self._shaped(self.zero_point.float(), like)
        return (self.qmin - zp) * scale, (self.qmax - zp) * scale

    def clipped_fraction(self, x: torch.Tensor) -> float:
        """Share of ``x`` more than half a step outside the representable range."""
        lo, hi = self.bounds(x)
        half = self._shaped(self.scale.float(), x) / 2
        return float(((x < lo - half) | (x > hi + half)).float().mean())

    def levels(self) -> torch.Tensor:
        """Every representable value (per-tensor grids only)."""
        q = torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32)
        return (q - self.zero_point.float().reshape(())) * self.scale.float().reshape(())

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self.scale.float(), self.zero_point.to(torch.int32)
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp.reshape(()), self.qmin, self.qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, zp, self.axis % x.dim(), self.qmin, self.qmax)


def _module_grid(mod: nn.Module) -> _Grid:
    if not mod.has_range:
        raise ConfigError(
            f"quantizer '{mod.point}' never saw data: run qgraph.calibrate (PTQ) or train a few "
            "steps (QAT) before comparing"
        )
    scale, zero_point = mod.qparams()
    axis = mod.spec.granularity.axis if mod.spec.is_per_channel else None
    return _Grid(scale, zero_point, mod.spec.quant_min, mod.spec.quant_max, axis)


def _op_grid(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _Grid:
    """qparams of a ``quantize_per_*`` / ``dequantize_per_*`` node from its arguments."""
    args = [get_constant(gm, a) if isinstance(a, torch.fx.Node) else a for a in node.args[1:]]
    if node.target in PER_CHANNEL_QDQ_OPS:
        scale, zero_point, axis, qmin, qmax = args[:5]
    else:
        (scale, zero_point, qmin, qmax), axis = args[:4], None
    return _Grid(torch.as_tensor(scale), torch.as_tensor(zero_point), int(qmin), int(qmax), axis)


# -- finding the quantized points --------------------------------------------------------
@dataclass
class _Place:
    """A quantized point of the quantized graph and its float counterpart."""

    producer: torch.fx.Node
    consumer: Optional[str]
    """Consumer of a quantized input edge; None for a quantized output."""
    probe: torch.fx.Node
    """Node whose output is the quantized activation (quantizer call, or a dequantize)."""
    grid: _Grid
    anchor: Optional[torch.fx.Node]
    float_node: str = ""

    @property
    def name(self) -> str:
        return f"{self.producer.name} -> {self.consumer}" if self.consumer else self.producer.name


def _quantizer_module(gm: torch.fx.GraphModule, node: object) -> Optional[nn.Module]:
    if not (isinstance(node, torch.fx.Node) and node.op == "call_module"):
        return None
    mod = gm.get_submodule(str(node.target))
    return mod if isinstance(mod, QUANTIZER_TYPES) else None


def _is_quant_step(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return _quantizer_module(gm, node) is not None or is_op(node, QUANTIZE_OPS | DEQUANTIZE_OPS)


def _producer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node:
    """The first node before ``node`` that is not a quantizer, quantize or dequantize."""
    while _is_quant_step(gm, node) and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def _anchor(nodes: dict[str, torch.fx.Node], owner: Optional[str]) -> Optional[torch.fx.Node]:
    """Anchor of the pattern ``owner`` belongs to (the conv of conv + ReLU), if annotated."""
    node = nodes.get(owner) if owner else None
    ann = node.meta.get(ANNOTATION_KEY) if node is not None else None
    return nodes.get(ann.anchor) if ann is not None else None


def _prepared_places(gm: torch.fx.GraphModule, nodes: dict[str, torch.fx.Node]) -> list[_Place]:
    places = []
    for node in gm.graph.nodes:
        mod = _quantizer_module(gm, node)
        if mod is None:
            continue
        producer = _producer(gm, node.args[0])
        point = node.meta.get(QUANTIZER_KEY)
        consumer = point[1] if isinstance(point, tuple) else None
        anchor = _anchor(nodes, consumer or producer.name)
        places.append(_Place(producer, consumer, node, _module_grid(mod), anchor))
    return places


def _converted_places(gm: torch.fx.GraphModule, nodes: dict[str, torch.fx.Node]) -> list[_Place]:
    """Quantize ops with dequantize users; which point each was is read off the wiring.

    An input edge feeds one consumer, and either requantizes an output point (its source is
    a dequantize) or shares its producer with other users (an output point's quantize is
    its producer's only user). An edge whose producer has no other user looks exactly like
    that producer's quantized output and is named after it.
    """
    places = []
    for q in gm.graph.nodes:
        dequantizes = [u for u in q.users if is_op(u, DEQUANTIZE_OPS)] if is_op(q, QUANTIZE_OPS) else []
        if not dequantizes:
            continue
        src = q.args[0]
        producer = _producer(gm, src)
        consumers = {c.name for d in dequantizes for c in d.users}
        edge = len(consumers) == 1 and (src is not producer or len(src.users) > 1)
        consumer = next(iter(consumers)) if edge else None
        anchor = _anchor(nodes, consumer or producer.name)
        places.append(_Place(producer, consumer, dequantizes[0], _op_grid(gm, q), anchor))
    return places


def _input_dependent(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes whose value depends on a graph input (everything but weights and constants)."""
    dependent: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _find_places(gm: torch.fx.GraphModule) -> list[_Place]:
    """Quantized activations of ``gm`` (points on weights and other constants left out)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    prepared = any(_quantizer_module(gm, n) is not None for n in gm.graph.nodes)
    places = _prepared_places(gm, nodes) if prepared else _converted_places(gm, nodes)
    dependent = _input_dependent(gm)
    return [p for p in places if p.producer in dependent]


def _float_counterpart(
    producer: torch.fx.Node, float_nodes: dict[str, torch.fx.Node], quant_names: set[str]
) -> torch.fx.Node | str:
    """The float node computing what ``producer`` computes, or why there is none."""
    node = float_nodes.get(producer.name)
    if node is None:
        return "no node of that name in the float capture"
    if (node.op, node.target) != (producer.op, producer.target):
        return f"the float node '{node.name}' is {node.target}, not {producer.target}"
    # A batch norm folded into this conv: the conv now outputs what the BN did.
    while (bn := single_user(node)) is not None and is_op(bn, BATCH_NORM_OPS) and bn.name not in quant_names:
        node = bn
    return node


# -- running the two graphs --------------------------------------------------------------
class _FloatRecorder(torch.fx.Interpreter):
    """Runs the float graph and keeps a copy of the named activations."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach().clone()  # a later in-place op must not change it
        return out


class _QuantRunner(torch.fx.Interpreter):
    """Runs the quantized graph; quantizer modules fake-quantize without updating ranges."""

    def __init__(self, gm: torch.fx.GraphModule, simulate: bool, on_probe):
        super().__init__(gm)
        self.simulate = simulate
        self.on_probe = on_probe
        self.grids: dict[str, _Grid] = {}

    def call_module(self, target, args, kwargs) -> Any:
        mod = self.fetch_attr(target)
        if not isinstance(mod, QUANTIZER_TYPES):
            return super().call_module(target, args, kwargs)
        if not self.simulate:
            return args[0]
        if target not in self.grids:
            self.grids[target] = _module_grid(mod)
        return self.grids[target].fake_quantize(args[0])

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        self.on_probe(n, out)
        return out


@dataclass
class _Energy:
    signal: float = 0.0
    noise: float = 0.0
    isolated_noise: float = 0.0
    shape: tuple[int, ...] = ()

    def add(self, ref: torch.Tensor, q: torch.Tensor, isolated: torch.Tensor) -> None:
        ref = ref.double()
        self.signal += float(ref.square().sum())
        self.noise += float((ref - q.double()).square().sum())
        self.isolated_noise += float((ref - isolated.double()).square().sum())
        self.shape = self.shape or tuple(q.shape)


def _private_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy in eval mode that shares no mutable state with ``gm``."""
    return eval_mode(copy_graph_module(gm))


def _float_graph(model: nn.Module, example: tuple) -> torch.fx.GraphModule:
    if isinstance(model, torch.fx.GraphModule):
        return _private_copy(model)
    return eval_mode(capture(model, example))


def _split_first(batches: Iterable[Any]) -> tuple[tuple, Iterable[Any]]:
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ConfigError("compare() got no batches; pass an iterable of example inputs")
    return as_args(first), itertools.chain([first], it)


def _refuse_dynamic(gm: torch.fx.GraphModule) -> None:
    """Dynamic activations have a new grid every batch; the SQNR tables assume a fixed one."""

    for node in gm.graph.nodes:
        dynamic = is_op(node, CHOOSE_QPARAMS_OPS) or (
            node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), DynamicQuantizer)
        )
        if dynamic:
            raise ConfigError(
                f"compare() does not handle dynamically quantized activations yet (node '{node.name}' picks its "
                "range per batch); compare the model's output with the float one, or use static PTQ for this report"
            )


@dataclass
class _Setup:
    float_gm: torch.fx.GraphModule
    quant_gm: torch.fx.GraphModule
    places: list[_Place]
    unmatched: dict[str, str]
    batches: Iterable[Any]


def _setup(model: nn.Module, quantized: torch.fx.GraphModule, batches: Iterable[Any]) -> _Setup:
    if not isinstance(quantized, torch.fx.GraphModule):
        raise ConfigError("pass the model returned by qgraph.prepare_ptq / prepare_qat or qgraph.convert")
    _refuse_dynamic(quantized)
    example, batches = _split_first(batches)
    quant_gm = _private_copy(quantized)
    float_gm = _float_graph(model, example)
    float_nodes = {n.name: n for n in float_gm.graph.nodes}
    quant_names = {n.name for n in quant_gm.graph.nodes}
    places, unmatched = [], {}
    for place in _find_places(quant_gm):
        found = _float_counterpart(place.producer, float_nodes, quant_names)
        if isinstance(found, str):
            unmatched[place.name] = found
        else:
            place.float_node = found.name
            places.append(place)
    if not places and not unmatched:
        raise ConfigError("the quantized model has no quantized activations (no observer, fake-quant or quantize op)")
    return _Setup(float_gm, quant_gm, places, unmatched, batches)


def _run_batch(setup: _Setup, args: tuple, simulate: bool, energies: dict[torch.fx.Node, _Energy]) -> None:
    recorder = _FloatRecorder(setup.float_gm, {p.float_node for p in setup.places})
    recorder.run(*args)
    by_probe = {p.probe: p for p in setup.places}

    def on_probe(node: torch.fx.Node, out: Any) -> None:
        place = by_probe.get(node)
        if place is None:
            return
        ref = recorder.values[place.float_node]
        if ref.shape != out.shape:
            raise ConfigError(
                f"'{place.name}' has shape {tuple(out.shape)} in the quantized model but its float "
                f"counterpart '{place.float_node}' has {tuple(ref.shape)}; was the float model changed?"
            )
        energies.setdefault(node, _Energy()).add(ref, out, place.grid.fake_quantize(ref))

    _QuantRunner(setup.quant_gm, simulate, on_probe).run(*args)


def _row(place: _Place, energy: _Energy, index: int) -> LayerError:
    anchor = place.anchor
    ann = anchor.meta.get(ANNOTATION_KEY) if anchor is not None else None
    producer = place.producer
    op = ann.rule if ann is not None else str(producer.target) if producer.op == "call_function" else producer.op
    return LayerError(
        name=place.name,
        op=op,
        module=module_path(anchor if anchor is not None else place.producer),
        sqnr_db=sqnr_db(energy.signal, energy.noise),
        isolated_sqnr_db=sqnr_db(energy.signal, energy.isolated_noise),
        shape=energy.shape,
        float_node=place.float_node,
        anchor=anchor.name if anchor is not None else "",
        index=index,
    )


def compare(
    model: nn.Module,
    prepared_or_quantized: torch.fx.GraphModule,
    batches: Iterable[Any],
    plot_path: str | os.PathLike | None = None,
    *,
    simulate_quantization: bool = True,
    progress: Optional[bool] = None,
) -> LayerErrorReport:
    """SQNR of every quantized activation against the float model, worst point first.

    ``model`` is the float model (or its :func:`qgraph.capture`) that was prepared;
    ``prepared_or_quantized`` is what :func:`qgraph.prepare_ptq` / :func:`qgraph.prepare_qat`
    (calibrated or trained) or :func:`qgraph.convert` returned. ``batches`` is an iterable of
    inputs (tensors or tuples of arguments); the first also captures the float model. With
    ``plot_path`` a PNG bar chart is written there. See the module docstring for the math,
    how places are matched and what ``simulate_quantization`` does. Neither model changes.
    A progress bar counts the batches: on a terminal by default, always with
    ``progress=True``, never with ``progress=False``.
    """
    setup = _setup(model, prepared_or_quantized, batches)
    if not simulate_quantization and not any(_quantizer_module(setup.quant_gm, p.probe) for p in setup.places):
        raise ConfigError("simulate_quantization=False needs a prepared model; a converted one has no float path")
    energies: dict[torch.fx.Node, _Energy] = {}
    count = 0
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    disable = None if progress is None else not progress
    with torch.no_grad():
        for batch in tqdm(setup.batches, total=total, desc="compare", unit="batch", leave=False, disable=disable):
            _run_batch(setup, as_args(batch), simulate_quantization, energies)
            count += 1
    order = {n: i for i, n in enumerate(setup.quant_gm.graph.nodes)}
    rows = [_row(p, energies[p.probe], order[p.probe]) for p in setup.places if p.probe in energies]
    report = LayerErrorReport(rows, setup.unmatched, count)
    if plot_path is not None:
        report.plot(plot_path)
    return report


# -- plots -------------------------------------------------------------------------------
def _figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas; pyplot's global state is left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # an optional dependency: only plots need it
        raise ImportError("plots need matplotlib: pip install matplotlib") from exc
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _bar_lengths(values: Sequence[float]) -> list[float]:
    """Values a bar chart can draw: ``inf`` 10 dB right of the best finite value, NaN at 0."""
    finite = [v for v in values if math.isfinite(v)]
    top = max(finite, default=50.0) + 10.0
    bottom = min(min(finite, default=0.0), 0.0) - 10.0
    return [top if v == math.inf else bottom if v == -math.inf else 0.0 if math.isnan(v) else v for v in values]


def _plot_report(report: LayerErrorReport, path: Path, highlight: int) -> Path:
    rows = report.in_graph_order()
    worst = {r.name for r in report.worst(highlight)}
    lengths = _bar_lengths([r.sqnr_db for r in rows] + [r.isolated_sqnr_db for r in rows])
    cumulative, isolated = lengths[: len(rows)], lengths[len(rows) :]
    fig = _figure(10, 1.5 + 0.2 * len(rows))
    ax = fig.add_subplot()
    ys = list(range(len(rows)))
    colors = ["tab:red" if r.name in worst else "tab:blue" for r in rows]
    ax.barh(ys, cumulative, color=colors, label="SQNR (cumulative)")
    ax.scatter(isolated, ys, color="black", s=12, zorder=3, label="isolated SQNR")
    for y, row, length in zip(ys, rows, isolated):
        if row.name in worst:
            text = f"  {row.name}: {_fmt_db(row.isolated_sqnr_db)} dB isolated"
            ax.annotate(text, (length, y), va="center", color="tab:red", fontsize=8)
    ax.set_yticks(ys, [f"{r.name} ({r.op})" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR dB against the float model (inf drawn 10 dB right of the best finite value)")
    ax.set_title(f"per-layer quantization error over {report.batches} batches, graph order; worst in red")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save_png(fig, path)


@dataclass
class _Layer:
    """What the histograms show: a pattern's anchor, its first input and its output point."""

    anchor: Optional[torch.fx.Node]
    input: Optional[torch.fx.Node]
    """The anchor's first argument in the quantized graph (its quantizer or dequantize)."""
    output: Optional[_Place]


def _pick_layer(places: Sequence[_Place], layer: str) -> _Layer:
    """``layer`` is a point name, an anchor node name or a module path."""
    for match in (
        lambda p: p.name == layer,
        lambda p: p.anchor is not None and p.anchor.name == layer,
        lambda p: p.anchor is not None and module_path(p.anchor) == layer,
    ):
        found = [p for p in places if match(p)]
        if found:
            break
    else:
        raise ConfigError(f"no quantized point or layer {layer!r}; choose one of {[p.name for p in places]}")
    anchor = found[0].anchor
    if anchor is None:  # a quantized point outside any pattern: show just that point
        return _Layer(None, None, found[0])
    outputs = [p for p in places if p.anchor is anchor and p.consumer is None]
    first = anchor.args[0] if anchor.args else None
    return _Layer(anchor, first if isinstance(first, torch.fx.Node) else None, outputs[-1] if outputs else None)


def _evaluate_constant(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    """Value of a node computed from constants only (a weight, its folding, its dequantize)."""
    if node.op == "get_attr":
        return get_constant(gm, node)
    mod = _quantizer_module(gm, node)
    if mod is not None:
        return _evaluate_constant(gm, node.args[0])
    args = torch.fx.node.map_arg(node.args, lambda n: _evaluate_constant(gm, n))
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: _evaluate_constant(gm, n))
    return node.target(*args, **kwargs)


def _grid_of(gm: torch.fx.GraphModule, node: object) -> Optional[_Grid]:
    """qparams of the quantizer or dequantize that produces ``node``, if it is one."""
    mod = _quantizer_module(gm, node)
    if mod is not None:
        return _module_grid(mod)
    if is_op(node, DEQUANTIZE_OPS | QUANTIZE_OPS):
        return _op_grid(gm, node)
    return None


def _weight_panel(gm: torch.fx.GraphModule, anchor: Optional[torch.fx.Node]):
    """(weight values, grid) of the anchor's weight input, or None."""
    if anchor is None or len(anchor.args) < 2 or not isinstance(anchor.args[1], torch.fx.Node):
        return None
    node = anchor.args[1]
    grid = _grid_of(gm, node)
    if grid is None or node in _input_dependent(gm):
        return None
    with torch.no_grad():
        return _evaluate_constant(gm, node).detach().float(), grid


def _draw_histogram(
    ax, values: Optional[torch.Tensor], grid: Optional[_Grid], title: str, max_lines: int = 48
) -> None:
    """Histogram of ``values`` (log counts) over their own range, with ``grid`` drawn on top.

    Representable values inside the view are red lines, or a red band when there are more
    than ``max_lines``; clipping limits inside the view are dashed. The title gives the
    qparams, the full representable range and the share of values clipped.
    """
    if values is None:
        ax.set_title(f"{title}: none", fontsize=9)
        ax.axis("off")
        return
    flat = values.flatten().float()
    left, right = float(flat.min()), float(flat.max())
    pad = 0.03 * ((right - left) or 1.0)
    ax.hist(flat.numpy(), bins=128, range=(left, right), color="tab:blue", alpha=0.8, log=True)
    ax.set_xlim(left - pad, right + pad)
    if grid is None:
        ax.set_title(f"{title} (not quantized)", fontsize=9)
        return
    lo, hi = (float(b.min()) if i == 0 else float(b.max()) for i, b in enumerate(grid.bounds(values)))
    levels = grid.levels() if grid.axis is None else None
    visible = levels[(levels >= left - pad) & (levels <= right + pad)] if levels is not None else None
    if visible is not None and len(visible) <= max_lines:
        for v in visible.tolist():
            ax.axvline(v, color="tab:red", lw=0.7, alpha=0.8)
    else:
        ax.axvspan(max(lo, left - pad), min(hi, right + pad), color="tab:red", alpha=0.12)
    for edge in (lo, hi):
        if left - pad <= edge <= right + pad:
            ax.axvline(edge, color="tab:red", lw=1.2, ls="--")
    if grid.axis is None:
        qparams = f"scale {float(grid.scale.reshape(())):.3g}, zp {int(grid.zero_point.reshape(()))}"
    else:
        qparams = f"per-channel: {grid.scale.numel()} scales, median {float(grid.scale.float().median()):.3g}"
    clipped = 100 * grid.clipped_fraction(values)
    ax.set_title(f"{title}\n{qparams}, range [{lo:.3g}, {hi:.3g}]; clipped {clipped:.2f}%", fontsize=9)


def plot_layer_histograms(
    model: nn.Module,
    prepared_or_quantized: torch.fx.GraphModule,
    batches: Iterable[Any],
    layer: str,
    path: str | os.PathLike,
) -> Path:
    """Histograms of one layer's weight, input and output with its quantization grid (PNG).

    ``layer`` is a name from :func:`compare`'s report, an anchor node name (``conv2d_3``) or a
    module path. The input and output panels show the *float* model's activations over all
    ``batches`` (what the grid should represent); the weight panel the weight the quantized
    model quantizes (BN-folded; in a converted model, its dequantized int8 values). Red lines
    mark the representable values ``(q - zero_point) * scale``, or a shaded band when there
    are too many to draw; dashed lines mark the clipping limits. Neither model changes.
    """
    setup = _setup(model, prepared_or_quantized, batches)
    gm = setup.quant_gm
    chosen = _pick_layer(setup.places, layer)
    in_float = _input_counterpart(setup, chosen.input)
    out_float = chosen.output.float_node if chosen.output is not None else None
    values = _float_values(setup, {name for name in (in_float, out_float) if name})
    weight = _weight_panel(gm, chosen.anchor)
    fig = _figure(15, 4.2)
    axes = fig.subplots(1, 3)
    _draw_histogram(axes[0], *(weight or (None, None)), "weight")
    in_grid = _grid_of(gm, chosen.input) if chosen.input is not None else None
    _draw_histogram(axes[1], values.get(in_float), in_grid, f"input {in_float or ''}")
    out_grid = chosen.output.grid if chosen.output is not None else None
    _draw_histogram(axes[2], values.get(out_float), out_grid, f"output {chosen.output.name if chosen.output else ''}")
    title = chosen.anchor.name if chosen.anchor is not None else layer
    where = module_path(chosen.anchor) if chosen.anchor is not None else ""
    fig.suptitle(f"{title} ({where}): float model's values, quantization grid in red", fontsize=10)
    fig.tight_layout()
    return _save_png(fig, Path(path))


def _float_values(setup: _Setup, names: set[str]) -> dict[str, torch.Tensor]:
    """Every batch's value of the named float nodes, flattened and concatenated."""
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    with torch.no_grad():
        for batch in setup.batches:
            recorder = _FloatRecorder(setup.float_gm, names)
            recorder.run(*as_args(batch))
            for name in names:
                collected[name].append(recorder.values[name].flatten())
    return {name: torch.cat(parts) for name, parts in collected.items()}


def _input_counterpart(setup: _Setup, in_node: Optional[torch.fx.Node]) -> Optional[str]:
    """Float node feeding the anchor, through its input quantizer."""
    if in_node is None:
        return None
    found = _float_counterpart(
        _producer(setup.quant_gm, in_node),
        {n.name: n for n in setup.float_gm.graph.nodes},
        {n.name for n in setup.quant_gm.graph.nodes},
    )
    return found.name if isinstance(found, torch.fx.Node) else None
