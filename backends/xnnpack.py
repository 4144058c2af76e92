"""XNNPACK quantizer rules: int8 symmetric per-channel weights, int8 affine activations.

These are the specs ExecuTorch's XNNPACK delegate runs in integer kernels (QS8):

* activations: int8 in ``[-128, 127]``, affine, one scale per tensor;
* weights: int8 in ``[-127, 127]`` (narrow range, so ``-w`` is representable), symmetric,
  one scale per output channel (axis 0 of conv and linear weights);
* bias: float — the delegate quantizes it itself to int32 with scale
  ``input_scale * weight_scale``.

Activation functions that XNNPACK folds into the preceding op (ReLU, ReLU6 = hardtanh(0, 6))
are matched *with* that op, so the only quantize after ``conv → relu`` is after the relu:
the clamp then also narrows the output range and every one of the 256 steps is used.
Shape ops, max-pooling and dropout pass the qparams of their input through unchanged.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.graph import CONV_OPS, DROPOUT_OPS, HARDTANH_OPS, LINEAR_OPS, RELU_OPS
from qgraph.rules import Backend, OpRule, QuantScheme, has_float_output
from qgraph.specs import PerChannel, QuantSpec

aten = torch.ops.aten

ADD_OPS = frozenset({aten.add.Tensor, aten.add_.Tensor})
MUL_OPS = frozenset({aten.mul.Tensor, aten.mul_.Tensor})
CAT_OPS = frozenset({aten.cat.default, aten.concat.default})
ACTIVATION_OPS = RELU_OPS | HARDTANH_OPS
HARDSWISH_OPS = frozenset({aten.hardswish.default, aten.hardswish_.default})
MAX_POOL_OPS = frozenset({aten.max_pool2d.default, aten.max_pool1d.default})
AVERAGING_OPS = frozenset(
    {aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default, aten.avg_pool1d.default, aten.mean.dim, aten.mean.default}
)
SHAPE_OPS = frozenset(
    {
        aten.flatten.using_ints,
        aten.reshape.default,
        aten.view.default,
        aten.permute.default,
        aten.transpose.int,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.unsqueeze.default,
    }
)


def xnnpack_scheme(is_qat: bool = False, weight_bits: int = 8, act_bits: int = 8) -> QuantScheme:
    """The XNNPACK int8 scheme; QAT tracks activations with a moving average (c = 0.01).

    Weights always use the range of the current weights (``averaging_constant=1``): a
    lagging weight range would clip weights that the optimizer just grew.
    """
    act = QuantSpec(
        dtype=torch.int8,
        bits=act_bits,
        symmetric=False,
        observer="moving_average_minmax" if is_qat else "minmax",
        averaging_constant=0.01,
    )
    weight = QuantSpec(
        dtype=torch.int8,
        bits=weight_bits,
        symmetric=True,
        narrow_range=True,
        granularity=PerChannel(axis=0),
        observer="moving_average_minmax",
        averaging_constant=1.0,
    )
    return QuantScheme(activation=act, weight=weight, bias=None)


def _float_tensor_operands(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> str | None:
    """Binary ops are quantized only between two float tensors (not ``x + 1``, not int counters)."""
    a, b = nodes[0].args[:2]
    if not (has_float_output(a) and has_float_output(b)):
        return "an operand is a scalar or not a float tensor"
    return None


def _constant_weight(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> str | None:
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


def _float_input(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> str | None:
    return None if has_float_output(nodes[0].args[0]) else "input is not a float tensor"


_WEIGHTED = {0: "act", 1: "weight", 2: "bias"}
_BINARY = {0: "act", 1: "act"}
_PASS = {0: "follow"}

RULES: tuple[OpRule, ...] = (
    OpRule("conv_relu", (CONV_OPS, ACTIVATION_OPS), _WEIGHTED, "act", _constant_weight),
    OpRule("conv", (CONV_OPS,), _WEIGHTED, "act", _constant_weight),
    OpRule("linear_relu", (LINEAR_OPS, ACTIVATION_OPS), _WEIGHTED, "act", _constant_weight),
    OpRule("linear", (LINEAR_OPS,), _WEIGHTED, "act", _constant_weight),
    OpRule("add_relu", (ADD_OPS, ACTIVATION_OPS), _BINARY, "act", _float_tensor_operands),
    OpRule("add", (ADD_OPS,), _BINARY, "act", _float_tensor_operands),
    OpRule("mul_relu", (MUL_OPS, ACTIVATION_OPS), _BINARY, "act", _float_tensor_operands),
    OpRule("mul", (MUL_OPS,), _BINARY, "act", _float_tensor_operands),
    OpRule("cat", (CAT_OPS,), {0: "list_shared"}, "shared"),
    OpRule("hardswish", (HARDSWISH_OPS,), {0: "act"}, "act", _float_input),
    OpRule("averaging", (AVERAGING_OPS,), {0: "follow_or_act"}, "shared", _float_input),
    OpRule("max_pool", (MAX_POOL_OPS,), _PASS, "shared"),
    OpRule("activation", (ACTIVATION_OPS,), _PASS, "shared"),
    OpRule("shape", (SHAPE_OPS,), _PASS, "shared"),
    OpRule("dropout", (DROPOUT_OPS,), _PASS, "shared"),
)

XNNPACK = Backend(name="xnnpack", rules=RULES, default_scheme=xnnpack_scheme)
