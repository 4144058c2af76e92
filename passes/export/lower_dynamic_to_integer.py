"""Lower dynamic layers to integer ops: one ``qgraph.dynamic_linear`` / ``dynamic_conv`` node each.

A dynamically quantized linear or conv of a converted graph reads::

    s, zp = choose_qparams.tensor(x, qmin, qmax, eps, dtype)
    x_dq  = dequantize_per_tensor.tensor(quantize_per_tensor.tensor(x, s, zp, ...), s, zp, ...)
    w_dq  = dequantize_per_channel(w_int8, w_scale, 0, axis=0, ...)      # or per tensor
    y     = linear(x_dq, w_dq, bias)                                   # or conv1d / conv2d

This pass replaces that pattern by one op of :mod:`qgraph.ops.integer` whose reference
implementation is the same computation (outputs are bit-identical), so that the ONNX
emitter can write it as ONNX Runtime's integer form ``DynamicQuantizeLinear →
MatMulInteger / ConvInteger`` with the weight kept in int8. A linear's weight is stored
transposed, the layout of ``MatMulInteger``'s second operand.

A linear's input may also be quantized per token (``*_per_token`` ops, one range per row):
it becomes ``dynamic_linear(..., per_token=True)``. Only a symmetric weight (all zero points
0) with a float (or no) bias matches; anything else keeps its quantize / dequantize ops, which the emitter writes
as plain QDQ. The choose / quantize / dequantize nodes left without users are removed.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.graph import CONV_OPS, LINEAR_OPS, add_constant, get_constant, is_op, remove_dead_nodes, replace_node
from qgraph.ops.integer import dynamic_conv, dynamic_linear  # noqa: F401  (registers torch.ops.qgraph)
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.ops.qdq import qd

aten = torch.ops.aten
qgraph_ops = torch.ops.qgraph


class LowerDynamicToInteger(Pass):
    """Fuse each dynamically quantized linear / conv into one integer op."""

    name = "lower_dynamic_to_integer"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        lowered = 0
        for node in list(gm.graph.nodes):
            if not is_op(node, LINEAR_OPS | CONV_OPS):
                continue
            parts = match_dynamic_layer(gm, node)
            if parts is None:
                continue
            x, choose_args, w_int, w_scale, bias = parts
            with gm.graph.inserting_before(node):
                if is_op(node, LINEAR_OPS):
                    w_node = add_constant(gm, f"{node.name}_weight_t", w_int.t().contiguous(), like=node)
                    s_node = add_constant(gm, f"{node.name}_weight_scale", w_scale, like=node)
                    new = gm.graph.call_function(
                        qgraph_ops.dynamic_linear.default, (x, w_node, s_node, bias, *choose_args)
                    )
                else:
                    w_node = add_constant(gm, f"{node.name}_weight", w_int, like=node)
                    s_node = add_constant(gm, f"{node.name}_weight_scale", w_scale, like=node)
                    conv = conv_args(node, w_int.dim() - 2)
                    new = gm.graph.call_function(
                        qgraph_ops.dynamic_conv.default, (x, w_node, s_node, bias, *conv, *choose_args)
                    )
            replace_node(gm, node, new, self.name)
            lowered += 1
        if lowered:
            remove_dead_nodes(gm)
        return PassResult(gm, lowered > 0)


_PER_TENSOR = (qd.choose_qparams.tensor, qd.quantize_per_tensor.tensor, qd.dequantize_per_tensor.tensor)
_PER_TOKEN = (
    qd.choose_qparams_per_token_asymmetric.default,
    qd.quantize_per_token.default,
    qd.dequantize_per_token.default,
)


def dynamic_input(node: torch.fx.Node):
    """``(x, (qmin, qmax, eps, dtype[, per_token]))`` when the first input of ``node`` is
    ``x`` quantized with qparams chosen at run time (per tensor; per token for a linear)."""
    x_dq = node.args[0]
    if is_op(x_dq, {_PER_TENSOR[2]}):
        ops = _PER_TENSOR
    elif is_op(x_dq, {_PER_TOKEN[2]}) and is_op(node, LINEAR_OPS):
        ops = _PER_TOKEN
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
    eps = choose.args[3] if ops is _PER_TENSOR else torch.finfo(torch.float32).eps
    return q.args[0], (quant_min, quant_max, eps, dtype) + (() if ops is _PER_TENSOR else (True,))


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
