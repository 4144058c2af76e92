"""ONNX translation of group-wise (int4 / int8) weights, for ``torch.onnx.export``'s table.

``torch.onnx`` has no translation for ``quantized_decomposed.dequantize_per_channel_group``.
ONNX (opset 21) has the op itself: ``DequantizeLinear`` with ``block_size`` dequantizes
blocks of ``block_size`` consecutive elements along ``axis`` with one scale and zero point
each — the per-group layout — and takes ``INT4`` inputs. The translation is::

    W[o, i] = (q[o, i] - zp[o, i // g]) · s[o, i // g]
            = Transpose(DequantizeLinear(Cast(qᵀ, INT4), sᵀ, Cast(zpᵀ, INT4), axis=0, block_size=g))

The constants are written transposed (``[in, out]``, blocks along axis 0) and cast to INT4
(the exporter's optimizer folds both into 4-bit initializers, two values per byte), and the
result is transposed back to the ``[out, in]`` weight ``aten.linear`` expects. The linear
becomes ``MatMul(x, Transpose(W))``; the two transposes cancel, leaving
``MatMul(x, DequantizeLinear(int4 [in, out], axis=0, block_size=g))`` — the pattern ONNX
Runtime fuses into its ``MatMulNBits`` kernel (its ``DQMatMulToMatMulNBits`` rewrite). By
default ONNX Runtime then runs it at ``accuracy_level`` 4 (activations quantized to int8 per
block of ``g``); ``session.qdq_matmulnbits_accuracy_level = 0`` keeps them float.

Eight-bit groups (an int8 embedding table) use the same form with INT8 constants. ONNX
models with these ops are written in opset 21 (:func:`needs_opset`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import torch.fx

from qgraph.core.opsets import GROUP_QDQ_OPS
from qgraph.ops.qdq import qd

OPSET = 21
"""First opset whose ``DequantizeLinear`` takes ``block_size`` and INT4."""


def needs_opset(model: torch.nn.Module) -> int | None:
    """Opset the model needs for its group-wise ops (21), or None for the exporter's default."""
    if not isinstance(model, torch.fx.GraphModule):
        return None
    uses = any(n.op == "call_function" and n.target in GROUP_QDQ_OPS for n in model.graph.nodes)
    return OPSET if uses else None


@lru_cache(maxsize=1)
def group_translations() -> dict[Callable, Callable]:
    """``{torch op overload: onnxscript function}`` for the per-group dequantize."""
    from onnxscript import ir
    from onnxscript import opset21 as op

    def dequantize_per_channel_group(q, scales, zero_points, quant_min, quant_max, dtype, group_size, output_dtype=None):
        storage = ir.DataType.INT4 if -8 <= quant_min and quant_max <= 7 else ir.DataType.INT8
        q_t = op.Cast(op.Transpose(q, perm=[1, 0]), to=storage)
        scales_t = op.Cast(op.Transpose(scales, perm=[1, 0]), to=ir.DataType.FLOAT)
        if zero_points is None:
            w_t = op.DequantizeLinear(q_t, scales_t, axis=0, block_size=group_size)
        else:
            zp_t = op.Cast(op.Transpose(zero_points, perm=[1, 0]), to=storage)
            w_t = op.DequantizeLinear(q_t, scales_t, zp_t, axis=0, block_size=group_size)
        return op.Transpose(w_t, perm=[1, 0])

    return {qd.dequantize_per_channel_group.default: dequantize_per_channel_group}
