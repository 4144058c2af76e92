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

from qgraph.core.graph import add_constant, get_constant
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.quant.batch_norm import bn_counter_updates, bn_params, conv_bn_pairs, fold_conv_bn_weights


class FoldConvBn(Pass):
    """PTQ: fold every eval-mode BatchNorm into the conv before it."""

    name = "fold_conv_bn"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        pairs = conv_bn_pairs(gm)
        counters = bn_counter_updates(gm, [bn.args[1] for _, bn in pairs])  # before erasing clears args
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
            gm.graph.erase_node(bn)
        for counter in counters:
            gm.graph.erase_node(counter)
        if pairs:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, bool(pairs))
