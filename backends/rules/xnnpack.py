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

from qgraph.backends.rules.base import BASE_RULES, BINARY, DYNAMIC_EPS, float_tensor_operands
from qgraph.core.opsets import ACTIVATION_OPS, MUL_OPS
from qgraph.quant.rules import Backend, OpRule, QuantScheme, derive_rules
from qgraph.quant.specs import PerChannel, PerTensor, PerToken, QuantSpec


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


def xnnpack_dynamic_scheme(per_token: bool = False) -> QuantScheme:
    """Dynamic int8: weights as in :func:`xnnpack_scheme`, activations int8 affine chosen per batch.

    The activation range is that of each input tensor (``PerTensor``, as ExecuTorch's
    ``get_symmetric_quantization_config(is_dynamic=True)``) or of each row of a linear's input
    (``per_token=True``); the output and bias stay float. XNNPACK runs these as its ``qd8``
    kernels, which choose one range per row of a linear's input and per image of a conv's.
    """
    act = QuantSpec(
        dtype=torch.int8,
        symmetric=False,
        granularity=PerToken() if per_token else PerTensor(),
        dynamic=True,
        eps=DYNAMIC_EPS,
    )
    return QuantScheme(activation=act, weight=xnnpack_scheme().weight, bias=None)


XNNPACK = Backend(
    name="xnnpack",
    # What XNNPACK states differently from the base (x86) table, as ExecuTorch's
    # XNNPACKQuantizer does: a relu after mul is fused into it, matmul has no pattern (float).
    rules=derive_rules(
        BASE_RULES,
        add_before={"mul": OpRule("mul_relu", (MUL_OPS, ACTIVATION_OPS), BINARY, "act", float_tensor_operands)},
        remove=("matmul",),
    ),
    default_scheme=xnnpack_scheme,
    dynamic_scheme=xnnpack_dynamic_scheme,
    dynamic_linear_per_token=True,
)
