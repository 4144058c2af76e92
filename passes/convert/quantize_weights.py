"""Quantize weights ahead of time: ``quantize(constant)`` becomes an integer constant.

After ``freeze_qparams`` a weight reads ``dequantize(quantize(w_float))``. Here the
quantize of every constant (``get_attr``) is evaluated once and stored as an int8 buffer,
so the converted graph holds ``dequantize(w_int8, scale, zero_point)`` — 4× smaller, and
the form ExecuTorch and ONNX Runtime fold into integer kernels.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.graph import add_constant, get_constant, is_op, remove_dead_nodes
from qgraph.core.opsets import QUANTIZE_OPS
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.passes.convert.freeze_qparams import FreezeQparams


class QuantizeWeights(Pass):
    name = "quantize_weights"
    requires = (FreezeQparams,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        folded = 0
        for node in list(gm.graph.nodes):
            if not is_op(node, QUANTIZE_OPS):
                continue
            src = node.args[0]
            if not (isinstance(src, torch.fx.Node) and src.op == "get_attr"):
                continue
            args = [get_constant(gm, a) if isinstance(a, torch.fx.Node) else a for a in node.args]
            q = node.target(*args)
            with gm.graph.inserting_before(node):
                const = add_constant(gm, f"{src.target}_int{torch.iinfo(q.dtype).bits}", q, like=node)
            node.replace_all_uses_with(const)
            gm.graph.erase_node(node)
            folded += 1
        if folded:
            remove_dead_nodes(gm)
            _drop_unused_attributes(gm)
        return PassResult(gm, folded > 0)


def _drop_unused_attributes(gm: torch.fx.GraphModule) -> None:
    """Delete float weights no node reads any more, so the module's state is the int8 one."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            if leaf in mod._parameters:
                del mod._parameters[leaf]
            elif leaf in mod._buffers:
                del mod._buffers[leaf]
