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

from qgraph.backends.common import (
    ACTIVATION_OPS,
    ADD_OPS,
    AVERAGING_OPS,
    BINARY,
    CAT_OPS,
    CONV_OPS,
    DROPOUT_OPS,
    HARDSWISH_OPS,
    LINEAR_OPS,
    MAX_POOL_OPS,
    MUL_OPS,
    PASS,
    SHAPE_OPS,
    WEIGHTED,
    constant_weight,
    float_input,
    float_tensor_operands,
)
from qgraph.rules import Backend, OpRule, QuantScheme
from qgraph.specs import PerChannel, QuantSpec

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


RULES: tuple[OpRule, ...] = (
    OpRule("conv_relu", (CONV_OPS, ACTIVATION_OPS), WEIGHTED, "act", constant_weight),
    OpRule("conv", (CONV_OPS,), WEIGHTED, "act", constant_weight),
    OpRule("linear_relu", (LINEAR_OPS, ACTIVATION_OPS), WEIGHTED, "act", constant_weight),
    OpRule("linear", (LINEAR_OPS,), WEIGHTED, "act", constant_weight),
    OpRule("add_relu", (ADD_OPS, ACTIVATION_OPS), BINARY, "act", float_tensor_operands),
    OpRule("add", (ADD_OPS,), BINARY, "act", float_tensor_operands),
    OpRule("mul_relu", (MUL_OPS, ACTIVATION_OPS), BINARY, "act", float_tensor_operands),
    OpRule("mul", (MUL_OPS,), BINARY, "act", float_tensor_operands),
    OpRule("cat", (CAT_OPS,), {0: "list_shared"}, "shared"),
    OpRule("hardswish", (HARDSWISH_OPS,), {0: "act"}, "act", float_input),
    OpRule("averaging", (AVERAGING_OPS,), {0: "follow_or_act"}, "shared", float_input),
    OpRule("max_pool", (MAX_POOL_OPS,), PASS, "shared"),
    OpRule("activation", (ACTIVATION_OPS,), PASS, "shared"),
    OpRule("shape", (SHAPE_OPS,), PASS, "shared"),
    OpRule("dropout", (DROPOUT_OPS,), PASS, "shared"),
)

XNNPACK = Backend(name="xnnpack", rules=RULES, default_scheme=xnnpack_scheme)
