"""Low-bit layers in ExecuTorch: quantized embedding kernels, and what the ``.pte`` cannot run.

**Embeddings.** ``dequantize → embedding`` becomes one kernel.

A weight-only quantized embedding (:func:`qgraph.embedding_weight_only`) converts to::

    W = dequantize_per_channel_group(q, s, zp, qmin, qmax, int8, g)   # or dequantize_per_channel(axis 0)
    y = aten.embedding(W, indices)

XNNPACK does not take embeddings, and ExecuTorch's runtime has no kernel for
``dequantize_per_channel_group``; it has ``quantized_decomposed::embedding_byte`` (int8
values) and ``embedding_4bit`` (two int4 values per byte), which gather the rows first and
dequantize only those. This rewrite (run by :func:`qgraph.export_pte` before lowering)
replaces the pair with the kernel, which computes the same values:
``y[..., j] = (q[i, j] - zp[i, j // g]) · s[i, j // g]`` for row ``i = indices[...]``.

4-bit tables are packed two values per byte, the even column in the high nibble, each
stored as ``q + 8`` (ExecuTorch's layout). Zero points are passed in the scales' dtype (the
kernels' contract), or omitted when all are 0 (symmetric tables).

The ops are defined by ExecuTorch (``executorch.exir.passes._quant_patterns_and_replacements``),
so this pass lives with the ExecuTorch emitter rather than in ``qgraph.passes``.

**Group-wise linears.** XNNPACK runs int4 group-wise weights only in its dynamically
quantized linear (``qd8-f32-qb4w``: the input quantized per token at run time, 8da4w). A
weight-only int4 linear (float input) has no such kernel; ExecuTorch 1.5's partitioner
still takes it and the program computes wrong values (measured: logits off by ~100 on a
small Llama), so :func:`group_weight_blocker` makes :func:`qgraph.export_pte` refuse it.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.graph import add_constant, get_constant, is_op, remove_dead_nodes, replace_node
from qgraph.core.opsets import EMBEDDING_OPS
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.ops.qdq import qd

aten = torch.ops.aten


def _register_ops() -> None:
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (defines embedding_byte/_4bit)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` int4 values in int8 → ``[rows, cols / 2]`` uint8, ExecuTorch's layout."""
    shifted = (q.to(torch.int16) + 8).to(torch.uint8)
    return (shifted[:, 0::2] << 4) | shifted[:, 1::2]


class UseEmbeddingKernels(Pass):
    """Replace ``embedding(dequantize(q_table), idx)`` by ExecuTorch's quantized embedding kernels."""

    name = "use_embedding_kernels"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        changed = 0
        for node in list(gm.graph.nodes):
            if not is_op(node, EMBEDDING_OPS):
                continue
            table = _quantized_table(gm, node.args[0])
            if table is None:
                continue
            _register_ops()
            q, scale, zero_point, qmin, qmax = table
            four_bit = qmin >= -8 and qmax <= 7 and q.shape[1] % 2 == 0
            with gm.graph.inserting_before(node):
                weight = add_constant(gm, "embedding_packed", pack_int4(q) if four_bit else q.clone(), like=node)
                s = add_constant(gm, "embedding_scale", scale.clone(), like=node)
                zp = None
                if bool((zero_point != 0).any()):
                    zp = add_constant(gm, "embedding_zero_point", zero_point.to(scale.dtype), like=node)
                op = qd.embedding_4bit.default if four_bit else qd.embedding_byte.default
                new = gm.graph.call_function(op, (weight, s, zp, qmin, qmax, node.args[1]))
            replace_node(gm, node, new, self.name)
            changed += 1
        if changed:
            remove_dead_nodes(gm)
        return PassResult(gm, changed > 0)


def group_weight_blocker(gm: torch.fx.GraphModule) -> str | None:
    """Why the ``.pte`` cannot run this graph's group-wise weights, or None.

    Every ``dequantize_per_channel_group`` must feed linears whose input is dequantized per
    token (8da4w), or an embedding (which :class:`UseEmbeddingKernels` turns into a kernel).
    """
    for node in gm.graph.nodes:
        if not is_op(node, {qd.dequantize_per_channel_group.default}):
            continue
        for user in node.users:
            if is_op(user, EMBEDDING_OPS) and user.args[0] is node:
                continue
            act = user.args[0] if is_op(user, {aten.linear.default}) else None
            if isinstance(act, torch.fx.Node) and is_op(act, {qd.dequantize_per_token.default}):
                continue
            return (
                f"'{user.name}' ({user.target}) reads group-wise weights with a float input; XNNPACK runs int4 "
                "group-wise weights only with int8 per-token dynamic activations. Quantize these layers with "
                "qgraph.int8_dynamic_int4_weight(...) for a .pte, or write this model with qgraph.export_onnx "
                "(ONNX Runtime runs weight-only int4 as MatMulNBits)"
            )
    return None


def _quantized_table(gm: torch.fx.GraphModule, dq: object):
    """``(q int8 [rows, cols], scale, zero_point, qmin, qmax)`` of a dequantized constant table
    (scales ``[rows]`` or ``[rows, cols / g]``), or None."""
    if not isinstance(dq, torch.fx.Node) or len(dq.users) != 1:
        return None
    if is_op(dq, {qd.dequantize_per_channel_group.default}):
        q, s, zp, qmin, qmax, dtype = dq.args[:6]
    elif is_op(dq, {qd.dequantize_per_channel.default}) and dq.args[3] == 0:
        q, s, zp, _, qmin, qmax, dtype = dq.args[:7]
    else:
        return None
    nodes = (q, s, zp)
    if dtype != torch.int8 or not all(isinstance(n, torch.fx.Node) and n.op == "get_attr" for n in nodes):
        return None
    q, s, zp = (get_constant(gm, n) for n in nodes)
    if q.dim() != 2:
        return None
    return q, s.to(torch.float32), zp, int(qmin), int(qmax)
