"""Fold Conv(1d/2d) + BatchNorm into one conv for PTQ.

``conv(x, w, b) → batch_norm(eval)`` becomes ``conv(x, w', b')`` with the folded weights of
:mod:`qgraph.quant.batch_norm`. The result is equal up to float rounding (checked in the tests to
1e-5 relative). The conv must be the batch norm's only producer path: a conv whose output
is also used elsewhere keeps its BN, because those users need the un-normalized value.

Run it on a graph in eval mode: folding uses the running statistics.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.quant.batch_norm import bn_counter_updates, bn_params, fold_conv_bn_weights
from qgraph.core.graph import BATCH_NORM_OPS, CONV_OPS, add_constant, get_constant, is_op, single_user
from qgraph.core.pass_manager import Pass, PassResult


def conv_bn_pairs(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """``(conv, bn)`` pairs where the BN is the conv's only user and both have constant params."""
    pairs = []
    for conv in gm.graph.nodes:
        if not is_op(conv, CONV_OPS):
            continue
        bn = single_user(conv)
        if bn is None or not is_op(bn, BATCH_NORM_OPS) or bn.args[0] is not conv:
            continue
        weight = conv.args[1]
        bias = conv.args[2] if len(conv.args) > 2 else None
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            continue
        if bias is not None and not (isinstance(bias, torch.fx.Node) and bias.op == "get_attr"):
            continue
        if bn_params(gm, bn) is None:
            continue
        pairs.append((conv, bn))
    return pairs


class FoldConvBn(Pass):
    """PTQ: fold every eval-mode BatchNorm into the conv before it."""

    name = "fold_conv_bn"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        pairs = conv_bn_pairs(gm)
        for conv, bn in pairs:
            weight_node = conv.args[1]
            bias_node = conv.args[2] if len(conv.args) > 2 else None
            weight = get_constant(gm, weight_node)
            bias = get_constant(gm, bias_node) if bias_node is not None else None
            w, b = fold_conv_bn_weights(weight, bias, bn_params(gm, bn))
            with gm.graph.inserting_before(conv):
                w_node = add_constant(gm, f"{weight_node.target}_folded", w, like=weight_node)
                b_node = add_constant(gm, f"{weight_node.target}_folded_bias", b, like=bn)
            args = list(conv.args) + [None] * (3 - len(conv.args))
            args[1], args[2] = w_node, b_node
            conv.args = tuple(args)
            bn.replace_all_uses_with(conv)
            for counter in bn_counter_updates(gm, bn.args[1]):
                gm.graph.erase_node(counter)
            gm.graph.erase_node(bn)
        if pairs:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, bool(pairs))
