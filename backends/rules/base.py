"""The base rule table of every backend, and the checks and edge roles it is written in.

:data:`BASE_RULES` is the x86 table; ``xnnpack.py`` derives its own from it by naming what
differs (:func:`~qgraph.quant.rules.derive_rules`), so the difference between the two
backends' patterns is that one call. Table order is match order: the first rule that
matches a node wins, so each fused pattern (``conv_relu``) comes before its anchor alone.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.opsets import (
    ACTIVATION_OPS,
    ADD_OPS,
    AVERAGING_OPS,
    CAT_OPS,
    CONV_OPS,
    EMBEDDING_OPS,
    HARDSWISH_OPS,
    LINEAR_OPS,
    MATMUL_OPS,
    MAX_POOL_OPS,
    MUL_OPS,
    SHAPE_OPS,
)
from qgraph.ops.stochastic_depth import EVAL_IDENTITY_OPS
from qgraph.quant.rules import OpRule, has_float_output
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


BASE_RULES: tuple[OpRule, ...] = (
    OpRule("conv_relu", (CONV_OPS, ACTIVATION_OPS), WEIGHTED, "act", constant_weight),
    # Dynamic convs only where XNNPACK runs them (dynamic_conv_supported): the x86 .pte runs
    # in XNNPACK too, and ONNX Runtime's ConvInteger is no faster for these.
    OpRule(
        "conv", (CONV_OPS,), WEIGHTED, "act", constant_weight, dynamic=DYNAMIC_CONV, dynamic_check=dynamic_conv_supported
    ),
    OpRule("linear_relu", (LINEAR_OPS, ACTIVATION_OPS), WEIGHTED, "act", constant_weight),
    OpRule("linear", (LINEAR_OPS,), WEIGHTED, "act", constant_weight, dynamic=DYNAMIC_LINEAR),
    OpRule("matmul", (MATMUL_OPS,), BINARY, "act", float_tensor_operands),
    OpRule("add_relu", (ADD_OPS, ACTIVATION_OPS), BINARY, "act", float_tensor_operands),
    OpRule("add", (ADD_OPS,), BINARY, "act", float_tensor_operands),
    OpRule("mul", (MUL_OPS,), BINARY, "act", float_tensor_operands),
    OpRule("cat", (CAT_OPS,), {0: "list_shared"}, "shared"),
    OpRule("hardswish", (HARDSWISH_OPS,), {0: "act"}, "act", float_input),
    OpRule("averaging", (AVERAGING_OPS,), {0: "follow_or_act"}, "shared", float_input),
    OpRule("max_pool", (MAX_POOL_OPS,), PASS, "shared"),
    OpRule("activation", (ACTIVATION_OPS,), PASS, "shared"),
    OpRule("shape", (SHAPE_OPS,), PASS, "shared"),
    OpRule("dropout", (EVAL_IDENTITY_OPS,), PASS, "shared"),
    OpRule("embedding", (EMBEDDING_OPS,), EMBEDDING, None, constant_table, needs_weight_only=True),
)
"""The patterns both backends quantize, in match order (the x86 table as it stands)."""
