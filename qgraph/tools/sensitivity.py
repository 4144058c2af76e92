"""Per-layer quantization sensitivity, and a greedy mixed-precision search built on it.

Why: at low bit widths (W4A4, W3A3) a few layers usually cause most of the accuracy loss —
typically the first conv, which sees raw pixels, and the classifier, whose outputs are the
logits. Keeping just those layers in float (or at 8 bits) recovers most of the accuracy at
a fraction of the cost of keeping the whole model in float. Finding them by hand means
many prepare / calibrate / convert runs; this module runs them and reports what it found.

Definitions (``metric`` is whatever ``eval_fn(converted_model)`` returns, higher is better):

* **quantizable layers**: the conv and linear modules the backend's rules annotate under
  ``scheme`` — found by running :func:`qgraph.prepare_ptq` once and reading the module path
  of every annotated conv / linear anchor node. A conv or linear called outside any
  submodule has no path that :meth:`QConfig.set_module_name` could address; it is skipped.
* ``fp32``: everything in float, through the same capture / BN-folding pipeline.
* ``quantized``: everything at ``scheme``.
* per layer ``L``:

  - ``kept(L)``: everything at ``scheme`` except ``L``, which stays at the *fallback*
    (float by default, or another :class:`QuantScheme`);
  - ``delta(L) = kept(L) - quantized``: how much promoting ``L`` alone wins back;
  - ``only(L)``: ``L`` at ``scheme`` and *everything else* in float — every operator the
    backend covers is set to ``None`` with :meth:`QConfig.set_operator`, and ``L`` is set
    back to ``scheme`` with :meth:`QConfig.set_module_name`, which takes precedence. (The
    global ``QConfig.scheme=None`` means "backend default", not float, so it cannot say
    this; setting only the *other layers* to None would still quantize adds, pools and
    concatenations, which would be charged to ``L``.)

  Layers are ranked by ``delta`` (largest first); ties go to the lower ``only`` metric
  (hurts more on its own), then to graph order.

The search (:func:`auto_mixed_precision`) promotes layers in that order until the loss
against fp32 is tolerable, then tries to drop each promoted layer again (a backward pass)
— sensitivities are measured one layer at a time and interactions can make an early
promotion unnecessary. The loss is **relative**::

    fp32 - metric <= tolerable_loss * |fp32|

so with accuracy in percent, ``tolerable_loss=0.01`` allows 1 % of the fp32 accuracy:
0.995 points at 99.5 %.

Only post-training quantization is measured (``mode="ptq"``): each configuration is
prepared, calibrated on ``calibration`` (default: the example inputs) and converted. The
model is captured once; every configuration starts from a private copy of that graph, and
PTQ is deterministic, so a configuration measured twice gives the same metric and the
search reuses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional, Sequence, Union

import torch.fx
from tabulate import tabulate
from torch import nn
from tqdm.auto import tqdm

from qgraph.api.capture import capture
from qgraph.api.pipeline import calibrate, convert, prepare_ptq
from qgraph.backends import get_backend
from qgraph.core.errors import ConfigError
from qgraph.core.graph import is_op, module_path
from qgraph.core.meta import ANNOTATION_KEY
from qgraph.core.opsets import CONV_OPS, LINEAR_OPS
from qgraph.quant.config import QConfig
from qgraph.quant.rules import Backend, QuantScheme

Fallback = Union[Literal["float"], QuantScheme]
EvalFn = Callable[[torch.fx.GraphModule], float]

LAYER_OPS = CONV_OPS | LINEAR_OPS


# -- results -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSensitivity:
    """One row of a :class:`SensitivityReport`."""

    path: str
    metric_kept: float
    """Metric with everything quantized except this layer (kept at the fallback)."""
    delta: float
    """``metric_kept - quantized_metric``: what promoting this layer alone wins back."""
    metric_only_quantized: float
    """Metric with only this layer quantized, everything else in float."""


@dataclass
class SensitivityReport:
    """Per-layer sensitivity, most sensitive layer first."""

    layers: list[LayerSensitivity]
    fp32_metric: float
    quantized_metric: float
    scheme: str
    fallback: str

    @property
    def paths(self) -> list[str]:
        """Layer paths, most sensitive first."""
        return [row.path for row in self.layers]

    def to_text(self) -> str:
        head = f"fp32: {self.fp32_metric:.4g}   all {self.scheme}: {self.quantized_metric:.4g}"
        rows = [[r.path, r.metric_kept, r.delta, r.metric_only_quantized] for r in self.layers]
        headers = ["layer", f"{self.fallback} here, rest {self.scheme}", "delta vs all quantized",
                   f"{self.scheme} here, rest float"]  # fmt: skip
        return head + "\n" + tabulate(rows, headers=headers, floatfmt=".4g")

    def __str__(self) -> str:
        return self.to_text()


@dataclass(frozen=True)
class Trial:
    """One configuration the search measured: the promoted layers and the metric."""

    layers: tuple[str, ...]
    metric: float
    step: str


@dataclass
class MixedPrecisionResult:
    """What :func:`auto_mixed_precision` chose and everything it tried on the way."""

    config: QConfig
    metric: float
    layers_promoted: list[str]
    tried: list[Trial]
    report: str
    met: bool
    """False when even promoting every layer did not reach the tolerance."""
    sensitivity: SensitivityReport = field(repr=False)

    def __str__(self) -> str:
        return self.report


# -- configurations ----------------------------------------------------------------------
def scheme_label(scheme: Fallback) -> str:
    """``"float"`` or ``"W4A4"`` (weight and activation bit widths) for tables."""
    if isinstance(scheme, QuantScheme):
        return f"W{scheme.weight.bits}A{scheme.activation.bits}"
    return "float"


def _as_scheme(fallback: Fallback) -> Optional[QuantScheme]:
    if isinstance(fallback, QuantScheme):
        return fallback
    if fallback == "float":
        return None
    raise ConfigError(f"fallback must be 'float' or a qgraph.QuantScheme, got {fallback!r}")


def mixed_config(scheme: QuantScheme, promoted: Iterable[str], fallback: Fallback = "float") -> QConfig:
    """``scheme`` everywhere except the ``promoted`` module paths, which get ``fallback``."""
    config = QConfig(scheme=scheme)
    for path in promoted:
        config.set_module_name(re.escape(path), _as_scheme(fallback))
    return config


def _all_float_config(backend: Backend) -> QConfig:
    return QConfig(operators={op: None for op in backend.covered_ops()})


def _only_config(backend: Backend, scheme: QuantScheme, path: str) -> QConfig:
    """Everything float (module name beats operator in precedence) except ``path``."""
    return _all_float_config(backend).set_module_name(re.escape(path), scheme)


# -- measuring ---------------------------------------------------------------------------
@dataclass
class _Runner:
    """prepare_ptq → calibrate → convert → eval_fn, on a graph captured once."""

    graph: torch.fx.GraphModule
    example_inputs: Any
    backend: str
    calibration: list
    eval_fn: EvalFn
    progress: Optional[bool] = None

    def metric(self, config: QConfig) -> float:
        prepared = prepare_ptq(self.graph, self.example_inputs, self.backend, config)
        calibrate(prepared, self.calibration, progress=False)
        return float(self.eval_fn(convert(prepared)))

    def bar(self, desc: str, total: Optional[int]) -> tqdm:
        """A progress bar of configurations measured: shown on a terminal when ``progress``
        is None, always when True, never when False; cleared when done (``leave=False``)."""
        disable = None if self.progress is None else not self.progress
        return tqdm(total=total, desc=desc, unit="config", leave=False, disable=disable)


def _runner(model, example_inputs, backend, calibration, eval_fn, mode, fallback) -> _Runner:
    """Check the arguments (before the slow capture), then capture the model once."""
    if mode != "ptq":
        raise ConfigError(f"mode={mode!r}: only 'ptq' is supported (QAT would need a training loop per configuration)")
    if not callable(eval_fn):
        raise ConfigError("eval_fn must be a callable that takes a converted model and returns a metric")
    _as_scheme(fallback)
    get_backend(backend)
    graph = model if isinstance(model, torch.fx.GraphModule) else capture(model, example_inputs)
    batches = [example_inputs] if calibration is None else list(calibration)
    return _Runner(graph, example_inputs, backend, batches, eval_fn)


def quantizable_layers(
    model: nn.Module, example_inputs: Any, backend: str = "xnnpack", scheme: QuantScheme | None = None
) -> list[str]:
    """Module paths of the conv / linear layers ``backend`` quantizes, in graph order."""
    prepared = prepare_ptq(model, example_inputs, backend, QConfig(scheme=scheme))
    paths: list[str] = []
    for node in prepared.graph.nodes:
        ann = node.meta.get(ANNOTATION_KEY)
        if ann is None or ann.anchor != node.name or not is_op(node, LAYER_OPS):
            continue
        path = module_path(node)
        if path and path not in paths:
            paths.append(path)
    return paths


def _layer_row(
    run: _Runner, backend: Backend, scheme: QuantScheme, fallback: Fallback, path: str, quantized: float, bar: tqdm
) -> LayerSensitivity:
    bar.set_postfix_str(path)
    kept = run.metric(mixed_config(scheme, [path], fallback))
    bar.update()
    only = run.metric(_only_config(backend, scheme, path))
    bar.update()
    return LayerSensitivity(path, kept, kept - quantized, only)


def _measure(run: _Runner, backend: Backend, scheme: QuantScheme, fallback: Fallback) -> SensitivityReport:
    paths = quantizable_layers(run.graph, run.example_inputs, backend.name, scheme)
    with run.bar("sensitivity", 2 + 2 * len(paths)) as bar:
        bar.set_postfix_str("fp32")
        fp32 = run.metric(_all_float_config(backend))
        bar.update()
        bar.set_postfix_str(f"all {scheme_label(scheme)}")
        quantized = run.metric(QConfig(scheme=scheme))
        bar.update()
        rows = [_layer_row(run, backend, scheme, fallback, path, quantized, bar) for path in paths]
    order = {path: i for i, path in enumerate(paths)}
    rows.sort(key=lambda r: (-r.delta, r.metric_only_quantized, order[r.path]))
    return SensitivityReport(rows, fp32, quantized, scheme_label(scheme), scheme_label(fallback))


def sensitivity(
    model: nn.Module,
    example_inputs: Any,
    eval_fn: EvalFn,
    backend: str = "xnnpack",
    scheme: QuantScheme | None = None,
    calibration: Iterable[Any] | None = None,
    mode: str = "ptq",
    fallback: Fallback = "float",
    progress: Optional[bool] = None,
) -> SensitivityReport:
    """Measure how much each quantizable layer costs (see the module docstring).

    ``eval_fn(converted)`` returns a metric where higher is better (e.g. accuracy).
    ``scheme`` None is the backend's default PTQ scheme. ``calibration`` is an iterable of
    batches (tensors or argument tuples), read once per configuration: 2 + 2 × layers
    prepare / calibrate / convert runs in all. ``fallback`` is what a layer is kept at in
    the ``metric_kept`` column: ``"float"`` or another scheme. The model is not changed.
    A progress bar counts the runs: on a terminal by default, always with ``progress=True``,
    never with ``progress=False``.
    """
    run = _runner(model, example_inputs, backend, calibration, eval_fn, mode, fallback)
    run.progress = progress
    rules = get_backend(backend)
    return _measure(run, rules, scheme or rules.default_scheme(False), fallback)


# -- the search --------------------------------------------------------------------------
@dataclass
class _Search:
    """Measured configurations keyed by the set of promoted layers."""

    run: _Runner
    scheme: QuantScheme
    fallback: Fallback
    fp32: float
    allowed: float
    known: dict[frozenset, float] = field(default_factory=dict)
    tried: list[Trial] = field(default_factory=list)
    bar: Optional[tqdm] = None

    def metric(self, layers: Sequence[str], step: str) -> float:
        key = frozenset(layers)
        if key not in self.known:
            if self.bar is not None:
                self.bar.set_postfix_str(step)
            self.known[key] = self.run.metric(mixed_config(self.scheme, layers, self.fallback))
            if self.bar is not None:
                self.bar.update()
        self.tried.append(Trial(tuple(layers), self.known[key], step))
        return self.known[key]

    def good(self, metric: float) -> bool:
        return self.fp32 - metric <= self.allowed


def _greedy(search: _Search, ranking: list[str]) -> tuple[list[str], float]:
    """Promote layers in ranking order until the loss is tolerable (or none are left)."""
    promoted: list[str] = []
    metric = search.metric(promoted, "all quantized")
    for path in ranking:
        if search.good(metric):
            break
        promoted.append(path)
        metric = search.metric(promoted, f"promote {path}")
    return promoted, metric


def _backward(search: _Search, promoted: list[str], metric: float) -> tuple[list[str], float]:
    """Drop each promoted layer whose absence keeps the loss tolerable."""
    for path in list(promoted):
        rest = [p for p in promoted if p != path]
        candidate = search.metric(rest, f"drop {path}")
        if search.good(candidate):
            promoted, metric = rest, candidate
    return promoted, metric


def _search_text(search: _Search, chosen: list[str], metric: float) -> str:
    rows = [
        [t.step, ", ".join(t.layers) or "-", t.metric, search.fp32 - t.metric, "yes" if search.good(t.metric) else "no"]
        for t in search.tried
    ]
    head = (
        f"fp32: {search.fp32:.4g}   allowed loss: {search.allowed:.4g}   "
        f"chosen: {', '.join(chosen) or 'none'} at {scheme_label(search.fallback)} -> {metric:.4g}"
    )
    headers = ["step", f"layers at {scheme_label(search.fallback)}", "metric", "loss vs fp32", "ok"]
    table = tabulate(rows, headers=headers, floatfmt=".4g")
    return head + "\n" + table


def auto_mixed_precision(
    model: nn.Module,
    example_inputs: Any,
    eval_fn: EvalFn,
    backend: str = "xnnpack",
    scheme: QuantScheme | None = None,
    fallback: Fallback = "float",
    tolerable_loss: float = 0.01,
    calibration: Iterable[Any] | None = None,
    report: SensitivityReport | None = None,
    progress: Optional[bool] = None,
) -> MixedPrecisionResult:
    """The smallest set of layers to keep at ``fallback`` so that the loss is tolerable.

    ``tolerable_loss`` is relative to the fp32 metric: the result satisfies
    ``fp32 - metric <= tolerable_loss * |fp32|`` (``met`` says whether it could). Layers
    are promoted greedily, most sensitive first, then each promoted layer is dropped again
    if the rest still meets the tolerance. ``fallback`` is ``"float"`` or a scheme (e.g.
    W8A8 while the rest is W4A4). ``report`` reuses a :func:`sensitivity` report measured
    with the same model, scheme and fallback. The returned ``config`` is a plain
    :class:`QConfig` for :func:`qgraph.prepare_ptq` / :func:`qgraph.prepare_qat`.
    Progress bars count the sensitivity runs, then the search's (``progress`` as in
    :func:`sensitivity`); ``str(result)`` is the report.
    """
    if not tolerable_loss >= 0:
        raise ConfigError(f"tolerable_loss={tolerable_loss} must be a non-negative fraction of the fp32 metric")
    run = _runner(model, example_inputs, backend, calibration, eval_fn, "ptq", fallback)
    run.progress = progress
    rules = get_backend(backend)
    scheme = scheme or rules.default_scheme(False)
    if report is None:
        report = _measure(run, rules, scheme, fallback)
    elif report.fallback != scheme_label(fallback) or report.scheme != scheme_label(scheme):
        raise ConfigError(
            f"report was measured for {report.scheme} with fallback {report.fallback}, "
            f"not {scheme_label(scheme)} with {scheme_label(fallback)}; measure it again or leave report=None"
        )
    search = _Search(run, scheme, fallback, report.fp32_metric, tolerable_loss * abs(report.fp32_metric))
    search.known[frozenset()] = report.quantized_metric
    search.known.update({frozenset([r.path]): r.metric_kept for r in report.layers})
    # at most one run per layer promoted, then one per layer dropped again
    with run.bar("mixed precision search", 2 * len(report.paths)) as search.bar:
        promoted, metric = _greedy(search, report.paths)
        if search.good(metric):
            promoted, metric = _backward(search, promoted, metric)
    return MixedPrecisionResult(
        config=mixed_config(scheme, promoted, fallback),
        metric=metric,
        layers_promoted=promoted,
        tried=search.tried,
        report=report.to_text() + "\n\n" + _search_text(search, promoted, metric),
        met=search.good(metric),
        sensitivity=report,
    )
