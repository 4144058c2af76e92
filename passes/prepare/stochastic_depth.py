"""Stochastic depth: the random mask a training-mode capture recorded becomes one op.

``torchvision.ops.stochastic_depth`` (EfficientNet, ConvNeXt, Swin, ...) branches on
``self.training`` in Python, so a model captured in training mode (QAT) holds::

    noise = empty(size) → bernoulli_(keep) → div_(keep)        # div_ only when keep > 0
    out   = mul(x, noise)                                       # (or mul(noise, x))

with ``size = [N, 1, ..., 1]`` ("row": one draw per sample) or ``[1, ..., 1]`` ("batch").
Nothing in that graph knows it should be the identity in eval mode. This pass rewrites it
into ``qgraph::stochastic_depth(x, p = 1 - keep, train=True, row)``
(:mod:`qgraph.ops.stochastic_depth`), which draws the same mask from the same random stream in
training — the rewritten graph computes bit for bit what the captured one did — and is a
dropout-like op for everything downstream: ``eval_mode`` turns it off, the backend rules
pass qparams through it, and ``convert`` removes it.

A graph captured in eval mode (PTQ) holds no mask; the pass then changes nothing.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.graph import copy_provenance, is_op, single_user
from qgraph.core.opsets import BERNOULLI_OPS, DIV_OPS, EMPTY_OPS, MUL_OPS
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.ops.stochastic_depth import STOCHASTIC_DEPTH

aten = torch.ops.aten



def _mask(node: object) -> tuple[list[torch.fx.Node], float, list] | None:
    """``(mask nodes from last to first, keep probability, size)`` when ``node`` is a mask."""
    if not isinstance(node, torch.fx.Node):
        return None
    chain: list[torch.fx.Node] = []
    divisor = None
    if is_op(node, DIV_OPS):
        divisor = node.args[1]
        chain.append(node)
        node = node.args[0]
    if not is_op(node, BERNOULLI_OPS) or len(node.users) != 1:
        return None
    keep = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    if not isinstance(keep, float) or (divisor is not None and divisor != keep) or (divisor is None and keep != 0.0):
        return None
    chain.append(node)
    empty = node.args[0]
    if not is_op(empty, EMPTY_OPS) or len(empty.users) != 1:
        return None
    chain.append(empty)
    return chain, keep, list(empty.args[0])


class StochasticDepth(Pass):
    """Rewrite ``x * bernoulli-mask`` into ``qgraph::stochastic_depth(x, p, train=True, row)``."""

    name = "stochastic_depth"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        rewritten = 0
        for mul in list(graph.nodes):
            if not is_op(mul, MUL_OPS) or len(mul.args) != 2:
                continue
            for x, noise in (mul.args, reversed(mul.args)):
                found = _mask(noise)
                if found is None or single_user(noise) is not mul or not isinstance(x, torch.fx.Node):
                    continue
                chain, keep, size = found
                x_val = x.meta.get("val")
                if not isinstance(x_val, torch.Tensor) or len(size) != x_val.dim():
                    continue
                row = not (isinstance(size[0], int) and size[0] == 1)
                with graph.inserting_before(mul):
                    sd = graph.call_function(STOCHASTIC_DEPTH, (x, 1.0 - keep, True, row))
                copy_provenance(sd, mul, self.name, action="replace")
                sd.meta["val"] = mul.meta.get("val")
                mul.replace_all_uses_with(sd)
                graph.erase_node(mul)
                for node in chain:
                    graph.erase_node(node)
                for s in size:
                    if isinstance(s, torch.fx.Node) and not s.users:
                        graph.erase_node(s)
                rewritten += 1
                break
        return PassResult(gm, rewritten > 0)
