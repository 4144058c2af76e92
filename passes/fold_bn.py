"""Fold the simulated Conv + BN of QAT into one conv with folded weight and bias (convert).

``FuseConvBnQat`` left ``conv(x, fq(w * s), None) / s [+ b] → batch_norm``. With the
running statistics this is ``conv(x, fq(w'), b')`` where ``w' = w * s`` and
``b' = (b - mean) * s + beta`` (:mod:`qgraph.batch_norm`). The weight's fake-quant module
now reads the constant ``w'`` — the same values it saw in eval mode, so its qparams fit —
and the divide, the bias add and the batch norm disappear.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.batch_norm import FOLDED_INTO_KEY, bn_counter_updates, bn_params, fold_conv_bn_weights
from qgraph.graph import BATCH_NORM_OPS, add_constant, get_constant, is_op, remove_dead_nodes
from qgraph.pass_manager import Pass, PassResult


class FoldBn(Pass):
    """Replace each QAT-simulated conv+BN by a conv with folded constants."""

    name = "fold_bn"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        folded = 0
        for bn in list(gm.graph.nodes):
            if not is_op(bn, BATCH_NORM_OPS) or FOLDED_INTO_KEY not in bn.meta:
                continue
            conv = nodes[bn.meta[FOLDED_INTO_KEY]]
            chain = [n for n in gm.graph.nodes if n.meta.get(FOLDED_INTO_KEY) == conv.name and n is not bn]
            scaled_w = _scaled_weight(conv)
            weight_node = scaled_w.args[0]
            bias = _original_bias(chain)
            w, b = fold_conv_bn_weights(
                get_constant(gm, weight_node),
                get_constant(gm, bias) if bias is not None else None,
                bn_params(gm, bn),
            )
            with gm.graph.inserting_before(scaled_w):
                w_node = add_constant(gm, f"{weight_node.target}_folded", w, like=weight_node)
                b_node = add_constant(gm, f"{weight_node.target}_folded_bias", b, like=bn)
            scaled_w.replace_all_uses_with(w_node)
            args = list(conv.args)
            args[2] = b_node
            conv.args = tuple(args)
            bn.replace_all_uses_with(conv)
            for counter in bn_counter_updates(gm, bn):
                gm.graph.erase_node(counter)
            for node in [bn, *reversed(chain)]:
                gm.graph.erase_node(node)
            folded += 1
        if folded:
            remove_dead_nodes(gm)
        return PassResult(gm, folded > 0)


def _scaled_weight(conv: torch.fx.Node) -> torch.fx.Node:
    """The ``w * s`` node feeding the conv, looking through an inserted quantizer call."""
    w = conv.args[1]
    while w.op == "call_module":
        w = w.args[0]
    return w


def _original_bias(chain: list[torch.fx.Node]) -> torch.fx.Node | None:
    """The conv's original bias: the get_attr behind ``y + reshape(b)`` in the chain, if any."""
    for node in chain:
        if node.target == torch.ops.aten.add.Tensor:
            view = node.args[1]
            return view.args[0]
    return None
