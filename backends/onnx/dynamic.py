"""ONNX translations of dynamic quantization, for ``torch.onnx.export``'s translation table.

``torch.onnx`` has no translation for ``choose_qparams`` nor for the ``.tensor`` / per-token
quantize ops that take qparams computed at run time. Three groups are given here:

* **Integer layers** (``qgraph.dynamic_linear`` / ``dynamic_conv``, made by
  :mod:`qgraph.passes.export.lower_dynamic_to_integer`): ONNX Runtime's ``quantize_dynamic`` form::

      x_q, x_s, x_zp = DynamicQuantizeLinear(x)                    # uint8, range of this batch
      acc = MatMulInteger(x_q, W_q, x_zp)   |  ConvInteger(x_q, W_q, x_zp, pads, strides, ...)
      y   = Cast(acc, float) * (x_s * w_scale) + bias

  ``DynamicQuantizeLinear`` picks ``scale = (max(x, 0) - min(x, 0)) / 255`` and ``zp =
  round(-min / scale)`` — the formula of ``choose_qparams.tensor`` for uint8. An int8 grid
  (XNNPACK scheme) is the same grid shifted by 128 (``q_u8 - zp_u8 == q_s8 - zp_s8``), so
  one translation serves both backends exactly. ONNX Runtime fuses the linear form into
  ``DynamicQuantizeMatMul``; ``ConvInteger`` pads with the input zero point, i.e. with 0.0.
  A per-token linear has no ``DynamicQuantizeLinear``: its rows are quantized by float math
  (the formula below), shifted to uint8, multiplied by ``MatMulInteger`` without zero
  points, and ``zp · Σ_k W[k, j]`` is subtracted in int32 — the same integers.
* **Per-tensor Q/DQ** left unfused: ``choose_qparams.tensor`` → ``DynamicQuantizeLinear``'s
  scale and zero point (shifted to int8 when the range is int8), then ``QuantizeLinear`` /
  ``DequantizeLinear`` with them.
* **Per-token Q/DQ**: no ONNX op picks a range per row, so the formulas of
  ``choose_qparams_per_token_asymmetric`` / ``quantize_per_token`` / ``dequantize_per_token``
  are written as float math (ReduceMin / ReduceMax over the last axis). It runs everywhere
  and computes the reference, but ONNX Runtime has no integer kernel for it.

``eps`` of ``choose_qparams`` is not representable in ``DynamicQuantizeLinear``; it only
matters for a range below ``255 · eps`` (the dynamic schemes use float32's eps, so only an
all-zero tensor, which both sides map to exact zeros).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch

from qgraph.ops.integer import DYNAMIC_INTEGER_OPS  # noqa: F401  (registers torch.ops.qgraph)
from qgraph.ops.qdq import qd

_INT8_SHIFT = 128
_PER_TOKEN_RANGE = (-128.0, 127.0)  # choose_qparams_per_token_asymmetric is int8 only


@lru_cache(maxsize=1)
def dynamic_translations() -> dict[Callable, Callable]:
    """``{torch op overload: onnxscript function}`` for every dynamic-quantization op."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    FLOAT, INT8, INT16, INT32, UINT8 = (ir.DataType[t] for t in ("FLOAT", "INT8", "INT16", "INT32", "UINT8"))

    def ints(*values: int):
        return op.Constant(value_ints=list(values))

    def scalar(value: float):
        return op.Constant(value_float=float(value))

    def dynamic_linear(x, w_int_t, w_scale, bias, quant_min, quant_max, eps, dtype, per_token=False):
        if per_token:
            return per_token_linear(x, w_int_t, w_scale, bias)
        x_q, x_scale, x_zp = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(x_q, w_int_t, x_zp)
        y = op.Mul(op.Cast(acc, to=FLOAT), op.Mul(x_scale, w_scale))
        return y if bias is None else op.Add(y, bias)

    def per_token_linear(x, w_int_t, w_scale, bias):
        # Rows quantized in float math, shifted to uint8 (q + 128, zp + 128: the same grid);
        # MatMulInteger without zero points, then the zero point's share, zp_u8 · Σ_k w[k, j],
        # is taken off in int32, so acc = Σ_k (q - zp) · w exactly.
        scale, zero_point = per_token_qparams(x)
        shift = scalar(_INT8_SHIFT)
        x_q = op.Clip(op.Add(op.Round(op.Mul(x, op.Reciprocal(scale))), zero_point), scalar(-128.0), scalar(127.0))
        x_u8 = op.Cast(op.Add(x_q, shift), to=UINT8)
        column_sums = op.ReduceSum(op.Cast(w_int_t, to=INT32), ints(0), keepdims=0)
        zp_u8 = op.Cast(op.Add(zero_point, shift), to=INT32)
        acc = op.Sub(op.MatMulInteger(x_u8, w_int_t), op.Mul(zp_u8, column_sums))
        y = op.Mul(op.Mul(op.Cast(acc, to=FLOAT), scale), w_scale)
        return y if bias is None else op.Add(y, bias)

    def per_token_qparams(x):
        """``choose_qparams_per_token_asymmetric``: one int8 range per row, XNNPACK's zero point."""
        qmin, qmax = _PER_TOKEN_RANGE
        zero = scalar(0.0)
        lo = op.Min(op.ReduceMin(x, ints(-1), keepdims=1), zero)
        hi = op.Max(op.ReduceMax(x, ints(-1), keepdims=1), zero)
        scale = op.Max(op.Div(op.Sub(hi, lo), scalar(qmax - qmin)), scalar(torch.finfo(torch.float32).eps))
        low_end, high_end = op.Div(lo, scale), op.Div(hi, scale)
        from_min = op.Add(scalar(qmin), low_end)
        from_max = op.Add(scalar(qmax), high_end)
        zero_point = op.Where(
            op.Greater(op.Add(from_min, from_max), zero), op.Sub(scalar(qmin), low_end), op.Sub(scalar(qmax), high_end)
        )
        return scale, op.Round(op.Clip(zero_point, scalar(qmin), scalar(qmax)))

    def dynamic_conv(x, w_int, w_scale, bias, stride, padding, dilation, groups, quant_min, quant_max, eps, dtype):
        x_q, x_scale, x_zp = op.DynamicQuantizeLinear(x)
        acc = op.ConvInteger(
            x_q, w_int, x_zp, strides=list(stride), pads=list(padding) * 2, dilations=list(dilation), group=groups
        )
        per_channel = ints(-1, *([1] * len(stride)))  # (C_out, 1, 1): broadcast over N and space
        y = op.Mul(op.Cast(acc, to=FLOAT), op.Reshape(op.Mul(x_scale, w_scale), per_channel))
        return y if bias is None else op.Add(y, op.Reshape(bias, per_channel))

    def choose_qparams_tensor(x, quant_min, quant_max, eps, dtype):
        _, scale, zero_point = op.DynamicQuantizeLinear(x)
        if quant_min < 0:  # the int8 grid: the uint8 one moved down by 128
            shifted = op.Sub(op.Cast(zero_point, to=INT16), op.Constant(value=ir.tensor(_INT8_SHIFT, dtype=INT16)))
            zero_point = op.Cast(shifted, to=INT8)
        return scale, zero_point

    def quantize_per_tensor_tensor(x, scale, zero_point, quant_min, quant_max, dtype):
        return op.QuantizeLinear(x, scale, zero_point)

    def dequantize_per_tensor_tensor(q, scale, zero_point, quant_min, quant_max, dtype, out_dtype=None):
        return op.DequantizeLinear(q, scale, zero_point)

    def choose_qparams_per_token(x, dtype):
        return per_token_qparams(x)

    def quantize_per_token(x, scales, zero_points, quant_min, quant_max, dtype):
        q = op.Round(op.Add(op.Mul(x, op.Reciprocal(scales)), zero_points))
        return op.Cast(op.Clip(q, scalar(quant_min), scalar(quant_max)), to=INT8)

    def dequantize_per_token(q, scales, zero_points, quant_min, quant_max, dtype, output_dtype=None):
        return op.Mul(op.Sub(op.Cast(q, to=FLOAT), zero_points), scales)

    return {
        torch.ops.qgraph.dynamic_linear.default: dynamic_linear,
        torch.ops.qgraph.dynamic_conv.default: dynamic_conv,
        qd.choose_qparams.tensor: choose_qparams_tensor,
        qd.quantize_per_tensor.tensor: quantize_per_tensor_tensor,
        qd.dequantize_per_tensor.tensor: dequantize_per_tensor_tensor,
        qd.choose_qparams_per_token_asymmetric.default: choose_qparams_per_token,
        qd.quantize_per_token.default: quantize_per_token,
        qd.dequantize_per_token.default: dequantize_per_token,
    }
