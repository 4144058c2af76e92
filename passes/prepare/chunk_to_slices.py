"""Chunk to slices: ``chunk`` / ``split`` and their ``getitem`` become one ``slice`` per piece.

Why: ``x.chunk(2, dim=1)`` (ShuffleNet's channel split) is one op with a tuple output, and
quantizers sit on tensors: no rule can pass the input's qparams through the tuple, so each
piece would be observed and quantized again with a range of its own. A slice is one tensor
op that picks a contiguous range of its input: its output is on the input's grid exactly,
so the backends' shape rule passes the qparams through, and XNNPACK runs it as a static
slice on int8 data instead of a float split outside the delegate.

Math: ``chunk(x, n, dim)`` cuts ``dim`` (size ``D``) into pieces of ``ceil(D / n)``, the last
one smaller; ``split(x, s, dim)`` into pieces of ``s``; ``split_with_sizes(x, sizes, dim)``
into the given sizes. Piece ``i`` is ``slice(x, dim, start_i, start_i + size_i)``: the same
elements, bit for bit. Only a static ``dim`` whose every use is ``getitem`` is rewritten.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx

from qgraph.core.graph import copy_provenance, is_op
from qgraph.core.opsets import SPLIT_OPS
from qgraph.core.pass_manager import Pass, PassResult

aten = torch.ops.aten



def piece_sizes(node: torch.fx.Node) -> tuple[int, list[int]] | None:
    """``(dim, sizes)`` of a chunk / split node with a static size along ``dim``, else None."""
    val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = dim % val.dim()
    size = val.shape[dim]
    if not isinstance(size, int):
        return None
    spec = node.args[1]
    if node.target == aten.chunk.default:
        step = math.ceil(size / spec)
        sizes = [min(step, size - start) for start in range(0, size, step)]
    elif node.target == aten.split.Tensor:
        sizes = [min(spec, size - start) for start in range(0, size, spec)]
    else:
        sizes = list(spec)
    return dim, sizes


class ChunkToSlices(Pass):
    """Rewrite ``getitem(chunk(x, n, dim), i)`` into ``slice(x, dim, start_i, end_i)``."""

    name = "chunk_to_slices"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        rewritten = 0
        for node in list(graph.nodes):
            if not is_op(node, SPLIT_OPS):
                continue
            found = piece_sizes(node)
            users = list(node.users)
            if found is None or not all(u.op == "call_function" and u.target is operator.getitem for u in users):
                continue
            dim, sizes = found
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            for user in users:
                i = user.args[1]
                with graph.inserting_before(user):
                    piece = graph.call_function(aten.slice.Tensor, (node.args[0], dim, starts[i], starts[i] + sizes[i]))
                copy_provenance(piece, user, self.name, action="replace")
                piece.meta["val"] = user.meta.get("val")
                user.replace_all_uses_with(piece)
                graph.erase_node(user)
            graph.erase_node(node)
            rewritten += 1
        return PassResult(gm, rewritten > 0)
