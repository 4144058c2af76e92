"""Fold bias dequantize: an int32 bias read through ``dequantize`` becomes its float value.

The x86 scheme stores biases as int32 with ``scale = input scale × weight scale`` (zero
point 0) so that ONNX Runtime adds them into its int32 accumulator. ExecuTorch's XNNPACK
delegate wants a float bias parameter and quantizes it itself with that very scale::

    b_float = q * (s_x * s_w)          (this pass, float32)
    q'      = round(b_float / (s_x * s_w))   (the delegate)

so ``q' == q`` as long as the float32 round trip is exact to half a step — true for
``|q| < 2**22``, far beyond any bias of a trained layer. Every ``dequantize_per_tensor`` /
``dequantize_per_channel`` of int32 whose inputs are constants is evaluated once and
replaced by a float constant.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.graph import add_constant, get_constant, is_op, remove_dead_nodes, replace_node
from qgraph.core.opsets import DEQUANTIZE_OPS
from qgraph.core.pass_manager import Pass, PassResult


class FoldBiasDequantize(Pass):
    """Replace ``dequantize(int32 constant)`` by the float constant it computes."""

    name = "fold_bias_dequantize"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        folded = 0
        for node in list(gm.graph.nodes):
            if not is_op(node, DEQUANTIZE_OPS) or node.args[-1] != torch.int32:
                continue
            inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
            if not all(a.op == "get_attr" for a in inputs):
                continue
            args = [get_constant(gm, a) if isinstance(a, torch.fx.Node) else a for a in node.args]
            value = node.target(*args, **node.kwargs)
            with gm.graph.inserting_before(node):
                const = add_constant(gm, f"{inputs[0].target}_float", value, like=node)
            replace_node(gm, node, const, self.name)
            folded += 1
        if folded:
            remove_dead_nodes(gm)
        return PassResult(gm, folded > 0)
