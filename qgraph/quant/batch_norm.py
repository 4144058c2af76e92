"""Batch-norm folding math and the graph facts about a ``aten.batch_norm`` node.

In eval mode ``bn(y) = (y - mean) * gamma / sqrt(var + eps) + beta``. For ``y = conv(x, w) + b``
that is again a conv with

    w' = w * s          (s = gamma / sqrt(var + eps), one factor per output channel)
    b' = (b - mean) * s + beta

which is what PTQ folding stores and what ``convert`` computes from a QAT graph.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx

from qgraph.core.graph import get_constant, is_op, single_user
from qgraph.core.opsets import BATCH_NORM_OPS, CONV_OPS


@dataclass
class BatchNormParams:
    gamma: torch.Tensor
    beta: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


def bn_params(gm: torch.fx.GraphModule, bn: torch.fx.Node) -> BatchNormParams | None:
    """The tensors of a ``batch_norm(x, gamma, beta, mean, var, training, momentum, eps, cudnn)``
    node, or None when they are not all constants (affine=False or no running stats)."""
    nodes = bn.args[1:5]
    if not all(isinstance(n, torch.fx.Node) and n.op == "get_attr" for n in nodes):
        return None
    gamma, beta, mean, var = (get_constant(gm, n) for n in nodes)  # type: ignore[arg-type]
    return BatchNormParams(gamma, beta, mean, var, float(bn.args[7]))


def fold_scale(p: BatchNormParams) -> torch.Tensor:
    """``s = gamma / sqrt(var + eps)``."""
    return p.gamma / torch.sqrt(p.var + p.eps)


def fold_conv_bn_weights(
    weight: torch.Tensor, bias: torch.Tensor | None, p: BatchNormParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w * s, (b - mean) * s + beta)`` with ``s`` broadcast along the output channels."""
    s = fold_scale(p).detach()
    shape = [-1] + [1] * (weight.dim() - 1)
    b = bias.detach() if bias is not None else torch.zeros_like(p.mean)
    return (weight.detach() * s.reshape(shape)), ((b - p.mean) * s + p.beta).detach()


def bn_counter_updates(gm: torch.fx.GraphModule, gammas: Iterable[object]) -> list[torch.fx.Node]:
    """The ``num_batches_tracked += 1`` nodes of the BNs whose weights are ``gammas`` (same module).

    All BNs at once, in one walk of the graph: a pass that drops ``k`` batch norms asks once,
    not ``k`` times.
    """
    counters = set()
    for gamma in gammas:
        if isinstance(gamma, torch.fx.Node) and gamma.op == "get_attr":
            prefix = str(gamma.target).rpartition(".")[0]
            counters.add(f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked")
    found = []
    if counters:
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target in counters:
                found.extend(u for u in node.users if u.op == "call_function")
    return found


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
