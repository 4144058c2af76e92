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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from qgraph.quant.batch_norm import FOLDED_INTO_KEY
from qgraph.core.graph import copy_provenance
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.passes.prepare.fold_conv_bn import conv_bn_pairs

aten = torch.ops.aten

SIMULATED_BN_KEY = "qgraph_simulated_bn"
EVAL_FORM_KEY = "qgraph_bn_eval_form"


@dataclass
class SimulatedBn:
    """What a conv needs to rebuild either form of its folded batch norm (node names)."""

    gamma: str
    beta: str
    mean: str
    var: str
    scale: str
    bias: str | None
    train_bias: str
    momentum: float
    eps: float
    cudnn: bool
    bn_meta: dict = field(default_factory=dict)
    form: str = "train"


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
                std = _make(graph, aten.sqrt.default, (_make(graph, aten.add.Tensor, (var, bn.args[7]), bn),), bn)
                scale = _make(graph, aten.div.Tensor, (gamma, std), bn)
                w_scale = _make(graph, aten.reshape.default, (scale, [-1] + [1] * (ndim - 1)), bn)
                scaled_w = _make(graph, aten.mul.Tensor, (weight, w_scale), conv)
                if bias is not None:
                    scaled_b = _make(graph, aten.mul.Tensor, (bias, scale), conv)
                else:
                    scaled_b = _make(graph, aten.zeros_like.default, (scale,), conv)
            scaled_w.meta["val"] = weight.meta.get("val")
            scaled_b.meta["val"] = mean.meta.get("val")
            args = list(conv.args) + [None] * (3 - len(conv.args))
            args[1], args[2] = scaled_w, scaled_b
            conv.args = tuple(args)
            conv.meta[SIMULATED_BN_KEY] = SimulatedBn(
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
            # Rebuild the tail in train form; the exported bn node is replaced by the new one.
            new_bn = _build_train_tail(gm, conv, conv.meta[SIMULATED_BN_KEY], training=bool(bn.args[5]))
            bn.replace_all_uses_with(new_bn)
            graph.erase_node(bn)
        return PassResult(gm, bool(pairs))


def _make(graph: torch.fx.Graph, target, args, src: torch.fx.Node, tag: tuple[str, str] | None = None) -> torch.fx.Node:
    node = graph.call_function(target, args)
    copy_provenance(node, src, FuseConvBnQat.name)
    if tag:
        node.meta[tag[0]] = tag[1]
    return node


def _nodes(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _build_train_tail(gm: torch.fx.GraphModule, conv: torch.fx.Node, info: SimulatedBn, training: bool) -> torch.fx.Node:
    """``batch_norm(conv / s)`` after ``conv``; returns the batch_norm node."""
    graph, nodes = gm.graph, _nodes(gm)
    ndim = conv.meta["val"].dim() if "val" in conv.meta else 4
    y_shape = [1, -1] + [1] * (ndim - 2)
    tag = (FOLDED_INTO_KEY, conv.name)
    old_users = [u for u in conv.users]
    with graph.inserting_after(conv):
        s_view = _make(graph, aten.reshape.default, (nodes[info.scale], y_shape), conv, tag)
    with graph.inserting_after(s_view):
        tail = _make(graph, aten.div.Tensor, (conv, s_view), conv, tag)
    bn_args = (tail, nodes[info.gamma], nodes[info.beta], nodes[info.mean], nodes[info.var],
               training, info.momentum, info.eps, info.cudnn)  # fmt: skip
    with graph.inserting_after(tail):
        bn = graph.call_function(aten.batch_norm.default, bn_args)
    bn.meta.update(info.bn_meta)
    bn.meta[FOLDED_INTO_KEY] = conv.name
    for n in graph.nodes:
        if n.meta.get(FOLDED_INTO_KEY) == conv.name and n.target == aten.div.Tensor:
            n.meta["val"] = conv.meta.get("val")
    for user in old_users:
        user.replace_input_with(conv, bn)
    info.form = "train"
    return bn


def _to_eval_form(gm: torch.fx.GraphModule, conv: torch.fx.Node, info: SimulatedBn) -> None:
    graph, nodes = gm.graph, _nodes(gm)
    tail = [n for n in graph.nodes if n.meta.get(FOLDED_INTO_KEY) == conv.name]
    bn = tail[-1]
    info.bn_meta = {k: v for k, v in bn.meta.items() if k != FOLDED_INTO_KEY}
    bn.replace_all_uses_with(conv)
    for node in reversed(tail):
        graph.erase_node(node)
    tag = (EVAL_FORM_KEY, conv.name)
    mean, scale = nodes[info.mean], nodes[info.scale]
    holder = conv.args[2]
    with graph.inserting_before(holder if holder.op == "call_module" else conv):
        if info.bias is not None:
            centered = _make(graph, aten.sub.Tensor, (nodes[info.bias], mean), conv, tag)
        else:
            centered = _make(graph, aten.neg.default, (mean,), conv, tag)
        folded = _make(graph, aten.mul.Tensor, (centered, scale), conv, tag)
        folded_bias = _make(graph, aten.add.Tensor, (folded, nodes[info.beta]), conv, tag)
    _set_bias_source(conv, folded_bias)
    info.form = "eval"


def _to_train_form(gm: torch.fx.GraphModule, conv: torch.fx.Node, info: SimulatedBn, training: bool) -> None:
    _set_bias_source(conv, _nodes(gm)[info.train_bias])
    for node in reversed([n for n in gm.graph.nodes if n.meta.get(EVAL_FORM_KEY) == conv.name]):
        gm.graph.erase_node(node)
    _build_train_tail(gm, conv, info, training)


def _set_bias_source(conv: torch.fx.Node, source: torch.fx.Node) -> None:
    """Feed ``source`` to the conv's bias — through the bias quantizer when there is one."""
    holder = conv.args[2]
    if isinstance(holder, torch.fx.Node) and holder.op == "call_module":
        holder.args = (source, *holder.args[1:])
    else:
        args = list(conv.args)
        args[2] = source
        conv.args = tuple(args)


def set_simulated_bn_form(gm: torch.fx.GraphModule, training: bool, bn_training: bool) -> bool:
    """Switch every simulated conv+BN to the train form (``training``) or the eval form.

    ``bn_training`` is the BN's own flag in train form (False once statistics are frozen).
    Returns True when the graph changed.
    """
    changed = False
    for conv in list(gm.graph.nodes):
        info = conv.meta.get(SIMULATED_BN_KEY)
        if info is None:
            continue
        if training and info.form == "eval":
            _to_train_form(gm, conv, info, bn_training)
            changed = True
        elif not training and info.form == "train":
            _to_eval_form(gm, conv, info)
            changed = True
    return changed
