"""Lower dynamic layers to reference kernels: ``choose → q → dq → linear / conv`` becomes one
``qgraph_ref.dynamic_linear`` / ``dynamic_conv`` (:mod:`qgraph.ops.reference_dynamic`).

A dynamically quantized layer of a converted graph reads::

    s, zp = choose_qparams.tensor(x, ...)              # or choose_qparams_per_token_asymmetric
    x_dq  = dequantize(quantize(x, s, zp), s, zp)       # .tensor, or *_per_token
    w_dq  = dequantize_per_channel(w_int, w_s, 0, 0)    # or per tensor, or
            dequantize_per_channel_group(w_int, w_s, 0, ..., group_size)   # 8da4w, linear only
    y     = linear(x_dq, w_dq, bias)                    # or conv1d / conv2d

and becomes ``dynamic_linear(x, w_int, w_s, bias, group_size, per_token, qmin, qmax,
runtime)``, which chooses the qparams, quantizes and accumulates in integers as
``runtime`` does. Only symmetric weights (zero points 0) and constant float biases match —
the forms the backends emit. A per-group weight on the ``"onnxruntime"`` runtime stays in
Q/DQ form: ``MatMulNBits`` quantizes its input per block itself, which no kernel here
reproduces. Why a dynamic layer was not lowered is kept in ``skipped``.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.graph import add_constant, get_constant, is_op, remove_dead_nodes, replace_node
from qgraph.core.opsets import CONV_OPS, LINEAR_OPS
from qgraph.core.pass_manager import PassResult
from qgraph.ops.qdq import qd
from qgraph.ops.reference_dynamic import dynamic_conv, dynamic_linear  # noqa: F401  (registers the ops)
from qgraph.passes.export.dynamic_layers import constant_bias, conv_args, dynamic_input, match_dynamic_layer
from qgraph.passes.lower.reference_patterns import RuntimeLowering

ref = torch.ops.qgraph_ref


def _group_weight(gm: torch.fx.GraphModule, w_dq: object) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(int weight [N, K], scale [N, K / g], g)`` of a symmetric per-group weight dequantize."""
    if not is_op(w_dq, {qd.dequantize_per_channel_group.default}):
        return None
    w, scale, zero_point = w_dq.args[:3]
    group_size = w_dq.args[6]
    if not all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in (w, scale)):
        return None
    if zero_point is not None and bool((get_constant(gm, zero_point) != 0).any()):
        return None
    w, scale = get_constant(gm, w), get_constant(gm, scale)
    if w.dim() != 2 or w.shape[1] % group_size:
        return None
    return w.clone(), scale.to(torch.float32).reshape(w.shape[0], -1).clone(), int(group_size)


class LowerDynamicReference(RuntimeLowering):
    """Rewrite each dynamically quantized linear / conv into a ``qgraph_ref`` dynamic kernel."""

    name = "lower_dynamic_reference"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self.skipped = {}
        lowered = 0
        for node in list(gm.graph.nodes):
            if not is_op(node, LINEAR_OPS | CONV_OPS) or dynamic_input(node) is None:
                continue
            new = self._lower(gm, node)
            if isinstance(new, str):
                self.skipped[node.name] = new
                continue
            replace_node(gm, node, new, self.name)
            lowered += 1
        if lowered:
            remove_dead_nodes(gm)
        return PassResult(gm, lowered > 0)

    def _lower(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | str:
        grouped = _group_weight(gm, node.args[1]) if is_op(node, LINEAR_OPS) else None
        if grouped is not None:
            if self.runtime != "xnnpack":
                return "per-group weights: MatMulNBits quantizes its input per block (no reference kernel)"
            ok, bias = constant_bias(node)
            if not ok:
                return "the bias is computed, not a constant"
            (x, choose), (w_int, w_scale, group_size) = dynamic_input(node), grouped
        else:
            parts = match_dynamic_layer(gm, node)
            if parts is None:
                return "the weight is not symmetric integers per channel or per group, or the bias is computed"
            x, choose, w_int, w_scale, bias = parts
            group_size = 0
        qmin, qmax = int(choose[0]), int(choose[1])
        per_token = len(choose) > 4 and bool(choose[4])
        with gm.graph.inserting_before(node):
            w_node = add_constant(gm, f"{node.name}_weight_int", w_int, like=node)
            s_node = add_constant(gm, f"{node.name}_weight_scale", w_scale, like=node)
            if is_op(node, LINEAR_OPS):
                args = (x, w_node, s_node, bias, group_size, per_token, qmin, qmax, self.runtime)
                return gm.graph.call_function(ref.dynamic_linear.default, args)
            conv = conv_args(node, w_int.dim() - 2)
            return gm.graph.call_function(ref.dynamic_conv.default, (x, w_node, s_node, bias, *conv, qmin, qmax, self.runtime))
