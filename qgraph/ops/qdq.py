"""The ``quantized_decomposed`` quantize / dequantize ops that ExecuTorch and ONNX understand.

Importing this module registers them (they live in ``torch.ao.quantization.fx._decomposed``).
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

from qgraph.core.opsets import (  # noqa: F401  (re-exported: their home is core's op vocabulary)
    DEQUANTIZE_OPS,
    DYNAMIC_DEQUANTIZE_OPS,
    DYNAMIC_QUANTIZE_OPS,
    QUANTIZE_OPS,
)
from qgraph.quant.specs import PerToken, QuantSpec

qd = torch.ops.quantized_decomposed

GROUP_QDQ_OPS = frozenset({qd.quantize_per_channel_group.default, qd.dequantize_per_channel_group.default})
"""Per-group ops (``*_per_channel_group``): scales ``[rows, cols // group_size]`` of a 2-D
tensor, used for int4 weights (XNNPACK's ``qb4w``)."""

CHOOSE_QPARAMS_OPS = frozenset({qd.choose_qparams.tensor, qd.choose_qparams_per_token_asymmetric.default})


def dynamic_qparams_call(spec: QuantSpec) -> tuple[object, tuple]:
    """``(choose_qparams op, its arguments after the input)`` for a dynamic ``QuantSpec``.

    Per tensor: ``choose_qparams.tensor(x, qmin, qmax, eps, dtype)`` — the range of the whole
    tensor widened to contain 0, ``scale = (hi - lo) / (qmax - qmin)`` (at least ``eps``),
    ``zp = qmin - round(lo / scale)``. Per token: ``choose_qparams_per_token_asymmetric(x,
    int8)`` — the same per row of the last dimension, XNNPACK's formula.
    """
    if isinstance(spec.granularity, PerToken):
        return qd.choose_qparams_per_token_asymmetric.default, (spec.dtype,)
    return qd.choose_qparams.tensor, (spec.quant_min, spec.quant_max, spec.eps, spec.dtype)


def dynamic_qdq_ops(spec: QuantSpec) -> tuple[object, tuple, object, tuple]:
    """``(quantize op, its trailing args, dequantize op, its trailing args)`` for a dynamic
    ``QuantSpec``; both ops take ``(x, scale, zero_point, *trailing)`` with tensor qparams."""
    tail = (spec.quant_min, spec.quant_max, spec.dtype)
    if isinstance(spec.granularity, PerToken):
        return qd.quantize_per_token.default, tail, qd.dequantize_per_token.default, (*tail, torch.float32)
    return qd.quantize_per_tensor.tensor, tail, qd.dequantize_per_tensor.tensor, tail


def dynamic_fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize ``x`` with qparams chosen from ``x`` itself, by the very ops
    ``convert`` emits (so a prepared and a converted model agree bit for bit).

    Gradients pass straight through: the range is that of ``x``, so nothing is clipped.
    """
    choose, choose_args = dynamic_qparams_call(spec)
    quantize, q_args, dequantize, dq_args = dynamic_qdq_ops(spec)
    with torch.no_grad():
        scale, zero_point = choose(x.detach(), *choose_args)
        dq = dequantize(quantize(x.detach(), scale, zero_point, *q_args), scale, zero_point, *dq_args)
    return x + (dq.to(x.dtype) - x).detach()
