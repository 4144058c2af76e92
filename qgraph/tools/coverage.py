"""Coverage: which conv / linear / matmul layers run in integer arithmetic, and why not.

For a prepared or converted graph, every conv, linear and matmul is listed with its MACs
per sample and whether it is quantized. A layer is quantized when its activation input and
(for conv / linear) its weight pass through a quantizer: an observer / fake-quant module in
a prepared graph, a ``dequantize`` op in a converted one. A float layer carries the
:class:`~qgraph.core.meta.Refusal` list the backend's rules gave (``node.meta['qgraph_refusals']``,
written by the annotate pass and by ``add_lora``), and a reason in words made from it.

MACs per sample: conv ``prod(out[1:]) * C_in / groups * prod(kernel)``; linear
``prod(out[1:]) * in_features``; matmul ``prod(out[1:]) * K``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx
from tabulate import tabulate

from qgraph.core.graph import module_path
from qgraph.core.meta import REFUSALS_KEY, Refusal
from qgraph.core.opsets import CONV_OPS, DEQUANTIZE_OPS, DYNAMIC_DEQUANTIZE_OPS, LINEAR_OPS, MATMUL_OPS, MM_OPS
from qgraph.observers.base import QUANTIZER_TYPES

aten = torch.ops.aten
COMPUTE_OPS = CONV_OPS | LINEAR_OPS | MATMUL_OPS | MM_OPS


@dataclass
class LayerCoverage:
    node: str
    module: str
    op: str
    macs: int
    quantized: bool
    reason: str = ""
    refusals: tuple[Refusal, ...] = ()
    """Why each rule refused a float layer (rule, reason, kind); empty when no rule was tried."""


@dataclass
class CoverageReport:
    layers: list[LayerCoverage] = field(default_factory=list)
    delegated_fraction: float | None = None

    @property
    def integer_mac_fraction(self) -> float:
        """Share of MACs (of conv / linear / matmul) that run in integer arithmetic."""
        total = sum(layer.macs for layer in self.layers)
        return sum(layer.macs for layer in self.layers if layer.quantized) / total if total else 0.0

    def float_layers(self) -> list[LayerCoverage]:
        return [layer for layer in self.layers if not layer.quantized]

    def to_text(self) -> str:
        """A table of every layer, then the share of MACs in integer arithmetic."""
        rows = [[la.node, la.module, la.op, la.macs, "int8" if la.quantized else "float", la.reason] for la in self.layers]
        text = tabulate(rows, headers=["node", "module", "op", "MACs/sample", "runs in", "why float"])
        text += f"\n\ninteger MACs: {100 * self.integer_mac_fraction:.1f} %"
        if self.delegated_fraction is not None:
            text += f"; compute ops inside the XNNPACK delegate: {100 * self.delegated_fraction:.1f} %"
        return text

    def __str__(self) -> str:
        return self.to_text()


def _per_sample(shape) -> int:
    dims = [int(d) if not isinstance(d, torch.SymInt) else 1 for d in shape[1:]]
    return math.prod(dims)


def layer_macs(node: torch.fx.Node) -> int:
    """MACs per sample of a conv, linear or matmul node, from the recorded shapes."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return 0
    inputs = [a.meta.get("val") for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    if node.target in CONV_OPS:
        weight = inputs[1]
        return _per_sample(out.shape) * math.prod(int(d) for d in weight.shape[1:])
    if node.target in LINEAR_OPS:
        return _per_sample(out.shape) * int(inputs[1].shape[-1])
    return _per_sample(out.shape) * int(inputs[0].shape[-1])


def _is_quantized_input(gm: torch.fx.GraphModule, arg: object) -> bool:
    if not isinstance(arg, torch.fx.Node):
        return False
    if arg.op == "call_module":
        return isinstance(gm.get_submodule(str(arg.target)), QUANTIZER_TYPES)
    return arg.op == "call_function" and arg.target in DEQUANTIZE_OPS | DYNAMIC_DEQUANTIZE_OPS


def coverage(model: torch.fx.GraphModule, pte_report=None) -> CoverageReport:
    """The coverage of a prepared or converted qgraph model (and of its ``.pte``, if given)."""
    report = CoverageReport(delegated_fraction=pte_report.delegated_fraction if pte_report is not None else None)
    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in COMPUTE_OPS:
            continue
        operands = node.args[:2]
        quantized = all(_is_quantized_input(model, a) for a in operands)
        refusals = () if quantized else tuple(node.meta.get(REFUSALS_KEY, ()))
        reason = "; ".join(map(str, refusals)) or ("" if quantized else "no rule or kept in float by the config")
        op = str(node.target).split(".")[1] if "." in str(node.target) else str(node.target)
        layer = LayerCoverage(node.name, module_path(node), op, layer_macs(node), quantized, reason, refusals)
        report.layers.append(layer)
    return report
