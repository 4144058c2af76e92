"""The two forms of a QAT conv's simulated batch norm, and the switch between them (not a pass).

:class:`~qgraph.passes.prepare.fuse_conv_bn_qat.FuseConvBnQat` builds the *train form*
``batch_norm(conv(x, fq(w * s), b * s) / s)`` and records a :class:`SimulatedBn` on the
conv; :func:`set_simulated_bn_form` (called by ``train_mode`` / ``eval_mode``) swaps it for
the *eval form* ``conv(x, fq(w * s), (b - mean) * s + beta)`` and back. The math is in
:mod:`qgraph.passes.prepare.fuse_conv_bn_qat`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.fx

from qgraph.core.graph import copy_provenance
from qgraph.core.meta import EVAL_FORM_KEY, FOLDED_INTO_KEY, SIMULATED_BN_KEY

aten = torch.ops.aten

PASS_NAME = "fuse_conv_bn_qat"
"""The pass recorded in ``from_node`` of the nodes the forms create."""


@dataclass
class SimulatedBn:
    """What a conv needs to rebuild either form of its folded batch norm.

    Nodes are named, not held: ``copy.deepcopy`` of a GraphModule makes new nodes under the
    same names, so a record of names stays true in the copy (see :class:`FormIndex`).
    """

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


def make_node(graph: torch.fx.Graph, target, args, src: torch.fx.Node, tag: tuple[str, str] | None = None) -> torch.fx.Node:
    node = graph.call_function(target, args)
    copy_provenance(node, src, PASS_NAME)
    if tag:
        node.meta[tag[0]] = tag[1]
    return node


class FormIndex:
    """One walk of the graph: nodes by name, and the nodes of each conv's current form.

    :class:`SimulatedBn` names its nodes rather than holding them, so that the record
    survives ``copy.deepcopy`` of the GraphModule (and :func:`~qgraph.core.graph.copy_graph_module`)
    unchanged: a copy keeps every node name but makes new nodes. A switch resolves the names
    here, built once per call, so switching ``k`` convs costs one walk of the graph, not ``k``.
    The index describes the graph as it was built; a switch moves each conv once, touching
    only that conv's own nodes, so the entries of the convs still to move stay true.
    """

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.nodes: dict[str, torch.fx.Node] = {}
        self.convs: list[torch.fx.Node] = []
        self.tails: dict[str, list[torch.fx.Node]] = defaultdict(list)
        self.eval_nodes: dict[str, list[torch.fx.Node]] = defaultdict(list)
        for node in graph.nodes:
            self.nodes[node.name] = node
            if SIMULATED_BN_KEY in node.meta:
                self.convs.append(node)
            if (conv := node.meta.get(FOLDED_INTO_KEY)) is not None:
                self.tails[conv].append(node)
            if (conv := node.meta.get(EVAL_FORM_KEY)) is not None:
                self.eval_nodes[conv].append(node)


def build_train_tail(
    graph: torch.fx.Graph, conv: torch.fx.Node, info: SimulatedBn, training: bool, nodes: Mapping[str, torch.fx.Node]
) -> torch.fx.Node:
    """``batch_norm(conv / s)`` after ``conv``; returns the batch_norm node.

    ``nodes`` resolves the names in ``info`` (a :class:`FormIndex`'s ``nodes``, or just the
    parameter nodes the caller has in hand).
    """
    ndim = conv.meta["val"].dim() if "val" in conv.meta else 4
    y_shape = [1, -1] + [1] * (ndim - 2)
    tag = (FOLDED_INTO_KEY, conv.name)
    old_users = [u for u in conv.users]
    with graph.inserting_after(conv):
        s_view = make_node(graph, aten.reshape.default, (nodes[info.scale], y_shape), conv, tag)
    with graph.inserting_after(s_view):
        tail = make_node(graph, aten.div.Tensor, (conv, s_view), conv, tag)
    tail.meta["val"] = conv.meta.get("val")  # conv(x, w * s, b * s) / s has the conv's shape
    bn_args = (tail, nodes[info.gamma], nodes[info.beta], nodes[info.mean], nodes[info.var],
               training, info.momentum, info.eps, info.cudnn)  # fmt: skip
    with graph.inserting_after(tail):
        bn = graph.call_function(aten.batch_norm.default, bn_args)
    bn.meta.update(info.bn_meta)
    bn.meta[FOLDED_INTO_KEY] = conv.name
    for user in old_users:
        user.replace_input_with(conv, bn)
    info.form = "train"
    return bn


def _to_eval_form(graph: torch.fx.Graph, conv: torch.fx.Node, info: SimulatedBn, index: FormIndex) -> None:
    tail = index.tails[conv.name]  # reshape, div, batch_norm in graph order
    bn = tail[-1]
    info.bn_meta = {k: v for k, v in bn.meta.items() if k != FOLDED_INTO_KEY}
    bn.replace_all_uses_with(conv)
    for node in reversed(tail):
        graph.erase_node(node)
    tag = (EVAL_FORM_KEY, conv.name)
    nodes = index.nodes
    mean, scale = nodes[info.mean], nodes[info.scale]
    holder = conv.args[2]
    with graph.inserting_before(holder if holder.op == "call_module" else conv):
        if info.bias is not None:
            centered = make_node(graph, aten.sub.Tensor, (nodes[info.bias], mean), conv, tag)
        else:
            centered = make_node(graph, aten.neg.default, (mean,), conv, tag)
        folded = make_node(graph, aten.mul.Tensor, (centered, scale), conv, tag)
        folded_bias = make_node(graph, aten.add.Tensor, (folded, nodes[info.beta]), conv, tag)
    _set_bias_source(conv, folded_bias)
    info.form = "eval"


def _to_train_form(
    graph: torch.fx.Graph, conv: torch.fx.Node, info: SimulatedBn, training: bool, index: FormIndex
) -> None:
    _set_bias_source(conv, index.nodes[info.train_bias])
    for node in reversed(index.eval_nodes.get(conv.name, [])):
        graph.erase_node(node)
    build_train_tail(graph, conv, info, training, index.nodes)


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
    Returns True when the graph changed. Time is linear in the graph: one :class:`FormIndex`.
    """
    index = FormIndex(gm.graph)
    changed = False
    for conv in index.convs:
        info = conv.meta[SIMULATED_BN_KEY]
        if training and info.form == "eval":
            _to_train_form(gm.graph, conv, info, bn_training, index)
            changed = True
        elif not training and info.form == "train":
            _to_eval_form(gm.graph, conv, info, index)
            changed = True
    return changed
