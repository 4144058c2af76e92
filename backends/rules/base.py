"""Op sets, checks and edge roles that several backends' rule tables share.

Each backend file lists its own rules (one entry per pattern); what is here is the
vocabulary those entries are written in.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.opsets import SHAPE_OPS
from qgraph.quant.rules import has_float_output
from qgraph.quant.specs import PerTensor, PerToken

aten = torch.ops.aten



def float_tensor_operands(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> str | None:
    """Binary ops are quantized only between two float tensors (not ``x + 1``, not int counters)."""
    a, b = nodes[0].args[:2]
    if not (has_float_output(a) and has_float_output(b)):
        return "an operand is a scalar or not a float tensor"
    return None


def constant_weight(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> str | None:
    """Conv and linear need a float input and a weight that is a parameter (or BN-scaled one)."""
    anchor = nodes[0]
    if not has_float_output(anchor.args[0]):
        return "input is not a float tensor"
    weight = anchor.args[1]
    if not isinstance(weight, torch.fx.Node) or not has_float_output(weight):
        return "weight is not a float tensor"
    if weight.op == "placeholder":
        return "weight is a graph input, not a parameter (use dynamic quantization)"
    return None


def not_depthwise(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> str | None:
    """Refuse a depthwise conv (one input channel per group, ``weight.shape[1] == 1``)."""
    anchor = nodes[0]
    groups = anchor.args[6] if len(anchor.args) > 6 else anchor.kwargs.get("groups", 1)
    weight = anchor.args[1].meta.get("val") if isinstance(anchor.args[1], torch.fx.Node) else None
    if groups > 1 and isinstance(weight, torch.Tensor) and weight.shape[1] == 1:
        return "depthwise conv: the runtime has no dynamically quantized depthwise kernel"
    return None


def not_after_channel_shuffle(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> str | None:
    """Refuse a layer whose input is reshaped from a tensor of more than 4 dimensions (the
    ``view(n, g, c/g, h, w) → transpose → view`` of a channel shuffle)."""
    node = nodes[0].args[0]
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in SHAPE_OPS:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 4:
            return "input comes through a 5-d reshape (channel shuffle): XNNPACK fails to resize its dynamic form"
        node = node.args[0]
    return None


def dynamic_conv_supported(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> str | None:
    """What XNNPACK's dynamically quantized conv takes (both backends' ``.pte`` run in it).

    Measured with ExecuTorch 1.5: a dynamic depthwise conv is not delegated (it runs in the
    portable kernels) and, followed by an SE block, the next delegate fails to resize at
    run time (mobilenet_v3); a dynamic conv fed by a channel shuffle fails to resize
    (shufflenet_v2). Both fail with ``xnn_status_invalid_parameter``; kept float, they run.
    """
    return not_depthwise(gm, nodes) or not_after_channel_shuffle(gm, nodes)


def float_input(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> str | None:
    """Unary ops are quantized only on float tensors."""
    return None if has_float_output(nodes[0].args[0]) else "input is not a float tensor"


DYNAMIC_EPS = torch.finfo(torch.float32).eps
"""Smallest scale of a dynamic range: the runtimes (XNNPACK's qd8, ONNX Runtime's
``DynamicQuantizeLinear``) have no floor, so the reference uses float32's eps, which only an
all-zero tensor reaches (2**-12, the static default, would coarsen every range below 0.06)."""

DYNAMIC_CONV = (PerTensor,)
DYNAMIC_LINEAR = (PerTensor, PerToken)
"""Dynamic activation granularities of convs and linears. Per token (one range per row of
the input) is for linears, whose rows are tokens or samples: XNNPACK's dynamic linear picks
one range per row itself. A conv's input is quantized per tensor (XNNPACK: per image)."""

def constant_table(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> str | None:
    """An embedding is quantized when its table is a float parameter, not a graph input."""
    table = nodes[0].args[0]
    if not isinstance(table, torch.fx.Node) or not has_float_output(table):
        return "the table is not a float tensor"
    if table.op == "placeholder":
        return "the table is a graph input, not a parameter"
    return None


EMBEDDING = {0: "weight"}
"""An embedding's only quantized edge is its table (weight-only; the indices are integers)."""

WEIGHTED = {0: "act", 1: "weight", 2: "bias"}
BINARY = {0: "act", 1: "act"}
PASS = {0: "follow"}
"""Edge roles of weighted ops (conv, linear), binary ops and pass-through ops."""
