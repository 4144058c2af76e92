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

from qgraph.core.graph import add_constant, is_op, remove_dead_nodes, replace_node
from qgraph.core.opsets import CONV_OPS, LINEAR_OPS
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.ops.integer import dynamic_conv, dynamic_linear  # noqa: F401  (registers torch.ops.qgraph)
from qgraph.passes.export.dynamic_layers import conv_args, match_dynamic_layer

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
