"""Remove dropout: in an inference graph it is the identity.

A dropout in eval mode returns its input; removing it lets the quantizers on both sides of
it (which share qparams) collapse into one quantize / dequantize pair in ``convert``.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.graph import is_op
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.ops.stochastic_depth import EVAL_IDENTITY_OPS


class RemoveDropout(Pass):
    name = "remove_dropout"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        removed = 0
        for node in list(gm.graph.nodes):
            if is_op(node, EVAL_IDENTITY_OPS):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
        return PassResult(gm, removed > 0)
