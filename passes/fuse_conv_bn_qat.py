"""Simulated Conv + BatchNorm folding for QAT that keeps BN statistics training.

The deployed model runs ``conv(x, q(w * s), b')`` with ``s = gamma / sqrt(var + eps)``
(see :mod:`qgraph.batch_norm`), so QAT must fake-quantize the *folded* weight ``w * s``.
Yet BN should keep normalizing with batch statistics and updating its running ones while
training. The rewrite (Jacob et al. 2018; torchao's ``_fuse_conv_bn_qat``) is::

    s    = gamma / sqrt(running_var + eps)
    y    = conv(x, fq(w * s), None) / s        # ≈ conv(x, w): undo the scale
    y    = y + b                               # original conv bias, if any
    out  = batch_norm(y, gamma, beta, running_mean, running_var, training, ...)

In eval mode ``out = conv(x, fq(w*s)) + (b - mean) * s + beta`` exactly, which is the
converted conv with folded bias. The nodes ``div``, ``add`` and ``batch_norm`` are tagged
with ``qgraph_folded_into = <conv name>`` so that the annotate pass treats them as part
of the conv and ``convert`` (``FoldBn``) can fold them away.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.batch_norm import FOLDED_INTO_KEY
from qgraph.graph import copy_provenance
from qgraph.pass_manager import Pass, PassResult
from qgraph.passes.fold_conv_bn import conv_bn_pairs

aten = torch.ops.aten


class FuseConvBnQat(Pass):
    """QAT: rewrite conv → bn so that the BN-scaled weight is what gets fake-quantized."""

    name = "fuse_conv_bn_qat"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        pairs = conv_bn_pairs(gm)
        graph = gm.graph
        for conv, bn in pairs:
            weight = conv.args[1]
            bias = conv.args[2] if len(conv.args) > 2 else None
            _, gamma, _, _, var = bn.args[:5]
            eps = float(bn.args[7])
            ndim = weight.meta["val"].dim()
            w_shape = [-1] + [1] * (ndim - 1)
            y_shape = [1, -1] + [1] * (ndim - 2)

            def make(target, args, src=conv):
                node = graph.call_function(target, args)
                copy_provenance(node, src, self.name)
                return node

            with graph.inserting_before(conv):
                std = make(aten.sqrt.default, (make(aten.add.Tensor, (var, eps), bn),), bn)
                scale = make(aten.div.Tensor, (gamma, std), bn)
                scaled_w = make(aten.mul.Tensor, (weight, make(aten.reshape.default, (scale, w_shape), bn)))
                scale_y = make(aten.reshape.default, (scale, y_shape), bn)
                b_view = make(aten.reshape.default, (bias, y_shape)) if bias is not None else None
            args = list(conv.args) + [None] * (3 - len(conv.args))
            args[1], args[2] = scaled_w, None
            conv.args = tuple(args)
            with graph.inserting_after(conv):
                unscaled = make(aten.div.Tensor, (conv, scale_y))
            tail = unscaled
            if b_view is not None:
                with graph.inserting_after(unscaled):
                    tail = make(aten.add.Tensor, (unscaled, b_view))
            conv.replace_all_uses_with(unscaled, delete_user_cb=lambda u: u is not unscaled)
            if tail is not unscaled:
                bn.replace_input_with(unscaled, tail)
            for node in (unscaled, tail, bn):
                node.meta[FOLDED_INTO_KEY] = conv.name
            _refresh_vals(conv, unscaled, tail, scaled_w)
        return PassResult(gm, bool(pairs))


def _refresh_vals(*nodes: torch.fx.Node) -> None:
    """New nodes have the shape and dtype of the conv output (or weight); copy its ``val``."""
    conv, unscaled, tail, scaled_w = nodes
    for n in (unscaled, tail):
        n.meta["val"] = conv.meta.get("val")
    scaled_w.meta["val"] = scaled_w.args[0].meta.get("val")
