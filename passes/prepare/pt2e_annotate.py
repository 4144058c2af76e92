"""PT2E annotate: let a torchao / ExecuTorch PT2E ``Quantizer`` decide, in qgraph's specs.

A PT2E quantizer (``XNNPACKQuantizer``, ``X86InductorQuantizer``, one of your own) writes
``node.meta["quantization_annotation"]``: an ``input_qspec_map`` from input node to spec and
an ``output_qspec``. This pass runs the quantizer the way torchao's ``prepare_pt2e`` does
(``transform_for_annotation``, ``annotate``, ``validate``) and translates every annotation
into qgraph's vocabulary (:mod:`qgraph.quant.specs`), so that resolve_specs, insert_quantizers
and convert run unchanged:

==============================  ==========================================================
PT2E                            qgraph
==============================  ==========================================================
``QuantizationSpec``            :class:`QuantSpec`: dtype; bits, narrow range from
                                ``quant_min`` / ``quant_max``; ``qscheme`` → symmetric and
                                per-tensor / per-channel(``ch_axis``); ``is_dynamic``; the
                                observer's kind, ``averaging_constant`` and ``eps``
``SharedQuantizationSpec``      :class:`SharedSpec` of the same edge or node
``DerivedQuantizationSpec``     :class:`DerivedSpec` — only when ``derive_qparams_fn`` is
                                ``scale = prod(scales)``, ``zero_point = 0`` (checked by
                                calling it), the one derivation qgraph computes
``FixedQParamsQuantizationSpec`` :class:`FixedSpec`
==============================  ==========================================================

The observer is read from an instance of ``observer_or_fake_quant_ctr`` (the inner
``activation_post_process`` of a fake-quant): ``averaging_constant`` → moving-average
min-max, ``histogram`` → qgraph's histogram observer with least-squared-error ranges (what
torch's ``HistogramObserver`` minimises), ``min_val`` → min-max; a ``scale`` that is an
``nn.Parameter`` makes the spec learnable. Nothing here imports torchao: a quantizer is
anything with ``annotate`` and ``validate``, and annotations are read by attribute name.

torchao annotates QAT graphs *before* folding conv + BN (its ``_fuse_conv_bn_qat`` then
moves the annotations), PTQ graphs *after* (``prepare_pt2e`` folds first). The pipeline does
the same: this pass runs before ``fuse_conv_bn_qat`` or after ``fold_conv_bn``, and records
the translated annotations by node name, with each annotated node's inputs and users, in
``gm.meta[PT2E_PLAN_KEY]``; :mod:`~qgraph.passes.prepare.apply_pt2e_annotations` writes them
onto the graph after folding, finding what replaced a folded node from those records.

``allow_implicit_sharing=False`` is not reproduced: qgraph always observes an edge with its
producer's quantizer when both carry the same spec (one observer instead of two that see
the same tensor and compute the same qparams).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
from torch import nn

from qgraph.core.errors import ConfigError
from qgraph.core.meta import PT2E_ANNOTATION_KEY, PT2E_PLAN_KEY
from qgraph.core.node_info import describe_node
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.passes.prepare.pt2e_plan import PlannedNode, Pt2ePlan
from qgraph.quant.specs import AnySpec, DerivedSpec, FixedSpec, PerChannel, PerTensor, Point, QuantSpec, SharedSpec

"""``node.meta`` key torchao's quantizers write (``torchao...quantizer.Q_ANNOTATION_KEY``)."""

_SYMMETRIC = {torch.per_tensor_symmetric, torch.per_channel_symmetric}
_PER_CHANNEL = {torch.per_channel_symmetric, torch.per_channel_affine}
_PER_TENSOR = {torch.per_tensor_symmetric, torch.per_tensor_affine}


def is_pt2e_quantizer(obj: object) -> bool:
    """True for a PT2E ``Quantizer`` (duck typing: it has ``annotate`` and ``validate``)."""
    return not isinstance(obj, str) and callable(getattr(obj, "annotate", None)) and callable(getattr(obj, "validate", None))




class Pt2eAnnotate(Pass):
    """Run a PT2E quantizer on the graph and record its decisions as qgraph specs."""

    name = "pt2e_annotate"

    def __init__(self, quantizer: Any):
        if not is_pt2e_quantizer(quantizer):
            raise ConfigError(
                f"backend={type(quantizer).__name__} is neither a backend name nor a PT2E Quantizer "
                "(an object with annotate() and validate())"
            )
        self.quantizer = quantizer

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        before = len(gm.graph.nodes)
        transform = getattr(self.quantizer, "transform_for_annotation", None)
        if callable(transform):
            gm = transform(gm)
        gm = self.quantizer.annotate(gm) or gm
        self.quantizer.validate(gm)
        plan = Pt2ePlan(rule=f"pt2e:{type(self.quantizer).__name__}")
        annotated = [n for n in gm.graph.nodes if n.meta.get(PT2E_ANNOTATION_KEY) is not None]
        referenced: set[torch.fx.Node] = set()
        for node in annotated:
            entry = _translate(node, node.meta[PT2E_ANNOTATION_KEY], referenced)
            if entry.input_specs or entry.output is not None:
                plan.nodes[node.name] = entry
        for node in referenced:  # shared / derived points: found again after folding too
            plan.nodes.setdefault(node.name, _planned(node))
        for node in annotated:
            del node.meta[PT2E_ANNOTATION_KEY]  # holds Node objects and observer constructors
        gm.meta[PT2E_PLAN_KEY] = plan
        return PassResult(gm, modified=bool(plan.nodes) or len(gm.graph.nodes) != before)


def _planned(node: torch.fx.Node) -> PlannedNode:
    users = [(u.name, u.all_input_nodes.index(node)) for u in node.users]
    return PlannedNode(inputs=[n.name for n in node.all_input_nodes], users=users)


def _translate(node: torch.fx.Node, annotation: Any, referenced: set) -> PlannedNode:
    entry = _planned(node)
    for producer, qspec in getattr(annotation, "input_qspec_map", {}).items():
        if qspec is not None:
            entry.input_specs[producer.name] = to_qgraph_spec(qspec, node, referenced, f"input '{producer.name}'")
    out = getattr(annotation, "output_qspec", None)
    if out is not None:
        entry.output = to_qgraph_spec(out, node, referenced, "output")
    return entry


def _point(edge_or_node: Any, referenced: set) -> Point:
    if isinstance(edge_or_node, torch.fx.Node):
        referenced.add(edge_or_node)
        return edge_or_node.name
    producer, consumer = edge_or_node
    referenced.update((producer, consumer))
    return (producer.name, consumer.name)


def to_qgraph_spec(qspec: Any, node: torch.fx.Node, referenced: set, where: str) -> AnySpec:
    """The qgraph spec for one PT2E spec on ``where`` (an input or the output) of ``node``."""
    place = f"the PT2E annotation of {describe_node(node)}, {where}"
    if hasattr(qspec, "edge_or_node"):
        return SharedSpec(_point(qspec.edge_or_node, referenced))
    if hasattr(qspec, "derive_qparams_fn"):
        _check_product_of_scales(qspec.derive_qparams_fn, place)
        qmin, qmax = _range(qspec, place)
        if (qmin, qmax) != _full_range(qspec.dtype):
            raise ConfigError(f"{place}: a derived spec must use the whole {qspec.dtype} range (qgraph's int32 biases)")
        return DerivedSpec(points=tuple(_point(p, referenced) for p in qspec.derived_from), dtype=qspec.dtype)
    if hasattr(qspec, "zero_point") and hasattr(qspec, "scale"):
        qmin, qmax = _range(qspec, place)
        return FixedSpec(float(qspec.scale), int(qspec.zero_point), qspec.dtype, qmin, qmax)
    if hasattr(qspec, "observer_or_fake_quant_ctr"):
        return _quant_spec(qspec, place)
    raise ConfigError(f"{place}: {type(qspec).__name__} is not a PT2E quantization spec qgraph knows")


def _quant_spec(qspec: Any, place: str) -> QuantSpec:
    qscheme = qspec.qscheme or torch.per_tensor_affine
    if qscheme not in _PER_TENSOR | _PER_CHANNEL:
        raise ConfigError(f"{place}: qscheme {qscheme} is not supported; use per-tensor or per-channel, affine or symmetric")
    symmetric = qscheme in _SYMMETRIC
    granularity = PerChannel(axis=qspec.ch_axis or 0) if qscheme in _PER_CHANNEL else PerTensor()
    bits, narrow = _bits(qspec, symmetric, place)
    observer = _observer(qspec.observer_or_fake_quant_ctr, place)
    if qspec.is_dynamic:  # qparams chosen per batch: nothing is observed
        observer.update(observer="moving_average_minmax", averaging_constant=0.01, range_method=None, learnable=False)
    try:
        return QuantSpec(
            dtype=qspec.dtype, bits=bits, symmetric=symmetric, narrow_range=narrow, granularity=granularity,
            dynamic=bool(qspec.is_dynamic), **observer,
        )  # fmt: skip
    except ConfigError as exc:
        raise ConfigError(f"{place}: {exc}") from exc


def _full_range(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return info.min, info.max


def _range(qspec: Any, place: str) -> tuple[int, int]:
    try:
        low, high = _full_range(qspec.dtype)
    except TypeError as exc:
        raise ConfigError(f"{place}: dtype {qspec.dtype} is not an integer dtype") from exc
    qmin = low if qspec.quant_min is None else int(qspec.quant_min)
    qmax = high if qspec.quant_max is None else int(qspec.quant_max)
    return qmin, qmax


def _bits(qspec: Any, symmetric: bool, place: str) -> tuple[int, bool]:
    """Bit width and narrow range of ``[quant_min, quant_max]``, the ranges qgraph's specs
    express: ``[-2^(b-1), 2^(b-1)-1]`` (narrow: from ``-(2^(b-1)-1)``) or ``[0, 2^b-1]``."""
    qmin, qmax = _range(qspec, place)
    signed = qspec.dtype.is_signed
    levels = qmax + 1
    bits = int(math.log2(levels)) + (1 if signed else 0) if levels > 0 else 0
    if levels > 0 and 2 ** int(math.log2(levels)) == levels:
        if not signed and qmin == 0:
            return bits, False
        if signed and qmin == -levels:
            return bits, False
        if signed and symmetric and qmin == -levels + 1:
            return bits, True
    kind = "[-2^(b-1), 2^(b-1)-1] or, symmetric, [-(2^(b-1)-1), 2^(b-1)-1]" if signed else "[0, 2^b-1]"
    raise ConfigError(f"{place}: range [{qmin}, {qmax}] of {qspec.dtype} is not one qgraph expresses ({kind})")


def _observer(ctr: Any, place: str) -> dict:
    """QuantSpec fields for the observer ``ctr`` builds, read from an instance of it."""
    try:
        made = ctr()
    except Exception as exc:  # a constructor of the user's: any failure means "cannot read it"
        raise ConfigError(f"{place}: could not build its observer / fake-quant ({exc})") from exc
    inner = getattr(made, "activation_post_process", made)
    fields: dict = {"learnable": isinstance(getattr(made, "scale", None), nn.Parameter)}
    eps = getattr(inner, "eps", None)
    if eps is not None:
        fields["eps"] = float(eps)
    if hasattr(inner, "histogram"):
        fields.update(observer="histogram", range_method="mse")
    elif hasattr(inner, "averaging_constant"):
        fields.update(observer="moving_average_minmax", averaging_constant=float(inner.averaging_constant))
    elif hasattr(inner, "min_val"):
        fields.update(observer="minmax")
    elif not getattr(made, "is_dynamic", False) and type(inner).__name__ != "PlaceholderObserver":
        raise ConfigError(
            f"{place}: observer {type(inner).__name__} is not one qgraph knows (min-max, moving-average min-max, "
            "histogram)"
        )
    return fields


class _ProbeObserver:
    """What ``derive_qparams_fn`` calls on the observers it derives from: fixed qparams."""

    def __init__(self, scale: torch.Tensor):
        self.scale = scale

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, torch.zeros_like(self.scale, dtype=torch.int32)


def _check_product_of_scales(fn: Any, place: str) -> None:
    """Refuse a derivation other than ``scale = scale_a × scale_b``, ``zero_point = 0``.

    Called on two probe observers with scales 0.5 and 0.375 (exact in binary) it must return
    0.1875 and 0: qgraph's :class:`DerivedSpec` computes exactly that.
    """
    try:
        scale, zero_point = fn([_ProbeObserver(torch.tensor([0.5])), _ProbeObserver(torch.tensor([0.375]))])
        ok = torch.allclose(torch.as_tensor(scale, dtype=torch.float64), torch.tensor(0.1875, dtype=torch.float64))
        ok = ok and bool((torch.as_tensor(zero_point) == 0).all())
    except Exception as exc:  # the user's function: any failure means "not the product"
        raise ConfigError(f"{place}: its derive_qparams_fn failed on probe observers ({exc})") from exc
    if not ok:
        raise ConfigError(
            f"{place}: derive_qparams_fn is not scale = product of scales with zero point 0, the only "
            "derived qparams qgraph computes (int32 bias = input scale x weight scale)"
        )
