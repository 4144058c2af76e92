"""Fused dynamic integer ops: ``torch.ops.qgraph.dynamic_linear`` and ``dynamic_conv``.

A dynamically quantized layer in a converted graph is six ops::

    scale, zp = choose_qparams.tensor(x, qmin, qmax, eps, dtype)
    x_dq      = dequantize(quantize(x, scale, zp), scale, zp)
    y         = linear(x_dq, dequantize_per_channel(w_int8, w_scale, 0), bias)

These ops are that whole pattern as one node, with exactly that reference implementation,
so that an emitter can write it as one integer kernel: ONNX Runtime's
``DynamicQuantizeLinear → MatMulInteger / ConvInteger → Cast → Mul(x_scale · w_scale) →
Add(bias)``, which is what its own ``quantize_dynamic`` writes. In integers::

    y[n, j] = x_scale · w_scale[j] · Σ_k (x_q[n, k] - x_zp) · w_q[j, k]  +  bias[j]

The weight must be symmetric (zero point 0): ``ConvInteger`` takes a single weight zero
point, and the per-channel scale is applied after the integer accumulation.
``dynamic_linear`` takes its weight transposed, ``(in_features, out_features)``, the
layout of ``MatMulInteger``'s second operand; with ``per_token=True`` its input range is
chosen per row (``choose_qparams_per_token_asymmetric``, int8), XNNPACK's own granularity.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qgraph.ops.qdq import qd


def _dequantized_input(
    x: Tensor, quant_min: int, quant_max: int, eps: float, dtype: torch.dtype, per_token: bool = False
) -> Tensor:
    if per_token:
        scale, zero_point = qd.choose_qparams_per_token_asymmetric(x, dtype)
        q = qd.quantize_per_token(x, scale, zero_point, quant_min, quant_max, dtype)
        return qd.dequantize_per_token(q, scale, zero_point, quant_min, quant_max, dtype, torch.float32)
    scale, zero_point = qd.choose_qparams.tensor(x, quant_min, quant_max, eps, dtype)
    q = qd.quantize_per_tensor.tensor(x, scale, zero_point, quant_min, quant_max, dtype)
    return qd.dequantize_per_tensor.tensor(q, scale, zero_point, quant_min, quant_max, dtype)


def _dequantized_weight(w_int: Tensor, w_scale: Tensor) -> Tensor:
    shape = (-1,) + (1,) * (w_int.dim() - 1)
    return w_int.to(torch.float32) * w_scale.to(torch.float32).reshape(shape)


@torch.library.custom_op("qgraph::dynamic_linear", mutates_args=())
def dynamic_linear(
    x: Tensor,
    w_int_t: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor],
    quant_min: int,
    quant_max: int,
    eps: float,
    dtype: torch.dtype,
    per_token: bool = False,
) -> Tensor:
    """``linear(dq(q(x)), w_int_t.T * w_scale, bias)`` with the range of ``x`` (of each row of
    ``x`` when ``per_token``) chosen per call."""
    weight = _dequantized_weight(w_int_t.t().contiguous(), w_scale)  # the layout of linear.weight: same sums
    x_dq = _dequantized_input(x, quant_min, quant_max, eps, dtype, per_token)
    return torch.nn.functional.linear(x_dq, weight, bias)


@dynamic_linear.register_fake
def _(x, w_int_t, w_scale, bias, quant_min, quant_max, eps, dtype, per_token=False):
    return x.new_empty((*x.shape[:-1], w_int_t.shape[1]))


@torch.library.custom_op("qgraph::dynamic_conv", mutates_args=())
def dynamic_conv(
    x: Tensor,
    w_int: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    quant_min: int,
    quant_max: int,
    eps: float,
    dtype: torch.dtype,
) -> Tensor:
    """``conv(dq(q(x)), w_int * w_scale, bias, ...)`` (1-d or 2-d) with the range of ``x`` chosen per call."""
    conv = torch.nn.functional.conv1d if w_int.dim() == 3 else torch.nn.functional.conv2d
    xq = _dequantized_input(x, quant_min, quant_max, eps, dtype)
    return conv(xq, _dequantized_weight(w_int, w_scale), bias, stride, padding, dilation, groups)


@dynamic_conv.register_fake
def _(x, w_int, w_scale, bias, stride, padding, dilation, groups, quant_min, quant_max, eps, dtype):
    spatial = []
    for i, size in enumerate(x.shape[2:]):
        kernel = dilation[i] * (w_int.shape[2 + i] - 1) + 1
        spatial.append((size + 2 * padding[i] - kernel) // stride[i] + 1)
    return x.new_empty((x.shape[0], w_int.shape[0], *spatial))


DYNAMIC_INTEGER_OPS = frozenset({torch.ops.qgraph.dynamic_linear.default, torch.ops.qgraph.dynamic_conv.default})
