"""Simulated Conv + BatchNorm folding for QAT that keeps BN statistics training.

The deployed model runs ``conv(x, q(w * s), b')`` with ``s = gamma / sqrt(var + eps)`` and
``b' = (b - mean) * s + beta`` (see :mod:`qgraph.quant.batch_norm`), so QAT must fake-quantize the
*folded* weight ``w * s``. Yet BN should keep normalizing with batch statistics and
updating its running ones while training. The graph therefore has two forms per conv:

*train form* (Jacob et al. 2018; torchao's ``_fuse_conv_bn_qat``)::

    y   = conv(x, fq(w * s), b * s) / s          # = conv(x, w) + b: undo the scale
    out = batch_norm(y, gamma, beta, mean, var, training=True, ...)

*eval form*, exactly what ``convert`` will store::

    out = conv(x, fq(w * s), (b - mean) * s + beta)

(``b = 0`` when the conv has no bias.) The conv has a bias input in both forms, so a
backend that quantizes biases (int32, scale = input scale × weight scale) puts its quantizer
on that edge once; switching forms only swaps what feeds it.

``FuseConvBnQat`` builds the train form and records a :class:`SimulatedBn` in the conv's
``meta``; :func:`set_simulated_bn_form` (called by ``train_mode`` / ``eval_mode``) switches
between the forms. Because the eval form computes ``w * s`` and ``b'`` with the same ops
``convert`` constant-folds, eval-mode fake-quant and the converted graph agree bit for bit.
Nodes of the train-form tail carry ``qgraph_folded_into = <conv name>`` so that the
annotate pass treats them as part of the conv.

The pass does a constant amount of work per pair: :func:`~qgraph.quant.batch_norm.conv_bn_pairs`
walks the graph once, and each tail is built from the nodes in hand, never by searching.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.meta import SIMULATED_BN_KEY
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.passes.prepare.simulated_bn import SimulatedBn, build_train_tail, make_node
from qgraph.quant.batch_norm import conv_bn_pairs

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
            _, gamma, beta, mean, var = bn.args[:5]
            ndim = weight.meta["val"].dim()
            with graph.inserting_before(conv):
                std = make_node(graph, aten.sqrt.default, (make_node(graph, aten.add.Tensor, (var, bn.args[7]), bn),), bn)
                scale = make_node(graph, aten.div.Tensor, (gamma, std), bn)
                w_scale = make_node(graph, aten.reshape.default, (scale, [-1] + [1] * (ndim - 1)), bn)
                scaled_w = make_node(graph, aten.mul.Tensor, (weight, w_scale), conv)
                if bias is not None:
                    scaled_b = make_node(graph, aten.mul.Tensor, (bias, scale), conv)
                else:
                    scaled_b = make_node(graph, aten.zeros_like.default, (scale,), conv)
            scaled_w.meta["val"] = weight.meta.get("val")
            scaled_b.meta["val"] = mean.meta.get("val")
            args = list(conv.args) + [None] * (3 - len(conv.args))
            args[1], args[2] = scaled_w, scaled_b
            conv.args = tuple(args)
            info = SimulatedBn(
                gamma=gamma.name,
                beta=beta.name,
                mean=mean.name,
                var=var.name,
                scale=scale.name,
                bias=bias.name if bias is not None else None,
                train_bias=scaled_b.name,
                momentum=float(bn.args[6]),
                eps=float(bn.args[7]),
                cudnn=bool(bn.args[8]) if len(bn.args) > 8 else False,
                bn_meta=dict(bn.meta),
            )
            conv.meta[SIMULATED_BN_KEY] = info
            # Rebuild the tail in train form; the exported bn node is replaced by the new one.
            params = {n.name: n for n in (gamma, beta, mean, var, scale)}
            new_bn = build_train_tail(graph, conv, info, bool(bn.args[5]), params)
            bn.replace_all_uses_with(new_bn)
            graph.erase_node(bn)
        return PassResult(gm, bool(pairs))
