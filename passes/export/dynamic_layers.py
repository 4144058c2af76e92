"""Matchers for dynamically quantized layers of a converted graph (not a pass).

A dynamic linear or conv reads ``choose_qparams → quantize(.tensor) → dequantize(.tensor)``
on its input (per tensor, or per token for a linear) and a symmetric int8 dequantize on its
weight. Both the export lowering (:mod:`~qgraph.passes.export.lower_dynamic_to_integer`) and
the reference lowering (:mod:`~qgraph.passes.lower.lower_dynamic_reference`) match that form
with these functions.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.graph import get_constant, is_op
from qgraph.core.opsets import LINEAR_OPS, PER_TENSOR_DYNAMIC_CHAIN, PER_TOKEN_DYNAMIC_CHAIN
from qgraph.ops.qdq import qd


def dynamic_input(node: torch.fx.Node):
    """``(x, (qmin, qmax, eps, dtype[, per_token]))`` when the first input of ``node`` is
    ``x`` quantized with qparams chosen at run time (per tensor; per token for a linear)."""
    x_dq = node.args[0]
    if is_op(x_dq, {PER_TENSOR_DYNAMIC_CHAIN[2]}):
        ops = PER_TENSOR_DYNAMIC_CHAIN
    elif is_op(x_dq, {PER_TOKEN_DYNAMIC_CHAIN[2]}) and is_op(node, LINEAR_OPS):
        ops = PER_TOKEN_DYNAMIC_CHAIN
    else:
        return None
    q, scale, zero_point = x_dq.args[:3]
    if not is_op(q, {ops[1]}) or q.args[1:3] != (scale, zero_point):
        return None
    choose = scale.args[0] if isinstance(scale, torch.fx.Node) and scale.args else None
    if not is_op(choose, {ops[0]}) or choose.args[0] is not q.args[0]:
        return None
    if zero_point.args[0] is not choose or (scale.args[1], zero_point.args[1]) != (0, 1):
        return None
    quant_min, quant_max, dtype = q.args[3:6]
    eps = choose.args[3] if ops is PER_TENSOR_DYNAMIC_CHAIN else torch.finfo(torch.float32).eps
    return q.args[0], (quant_min, quant_max, eps, dtype) + (() if ops is PER_TENSOR_DYNAMIC_CHAIN else (True,))


def constant_bias(node: torch.fx.Node) -> tuple[bool, torch.fx.Node | None]:
    """``(ok, bias)``: ok when the layer's bias is absent or a constant (not computed)."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return bias is None or (isinstance(bias, torch.fx.Node) and bias.op == "get_attr"), bias


def match_dynamic_layer(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """``(x, (qmin, qmax, eps, dtype[, per_token]), w_int8, w_scale float32 [C_out], bias)`` or None."""
    found = dynamic_input(node)
    weight = _symmetric_weight(gm, node.args[1]) if found is not None else None
    ok, bias = constant_bias(node)
    if weight is None or not ok:
        return None
    return (*found, *weight, bias)


def _symmetric_weight(gm: torch.fx.GraphModule, w_dq: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(int8 weight, per-output-channel float32 scale)`` of a symmetric weight dequantize."""
    if is_op(w_dq, {qd.dequantize_per_channel.default}):
        w, scale, zero_point, axis = w_dq.args[:4]
        if axis != 0 or not all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in (w, scale, zero_point)):
            return None
        w, scale, zero_point = (get_constant(gm, a) for a in (w, scale, zero_point))
    elif is_op(w_dq, {qd.dequantize_per_tensor.default}):
        w, scale, zero_point = w_dq.args[:3]
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
            return None
        w = get_constant(gm, w)
        scale, zero_point = torch.full((w.shape[0],), float(scale)), torch.tensor(int(zero_point))
    else:
        return None
    if w.dtype != torch.int8 or bool((zero_point != 0).any()):
        return None
    return w.clone(), scale.to(torch.float32).clone()


def conv_args(node: torch.fx.Node, spatial: int) -> tuple[list[int], list[int], list[int], int]:
    """``(stride, padding, dilation, groups)`` of an ``aten.conv{1,2}d``, one entry per spatial dim."""
    defaults = ([1], [0], [1], 1)
    names = ("stride", "padding", "dilation", "groups")
    values = [
        node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(name, default)
        for i, (name, default) in enumerate(zip(names, defaults))
    ]
    lists = [list(v) * spatial if len(v) == 1 else list(v) for v in values[:3]]
    return (*lists, int(values[3]))
