"""Lower reference: ``dequantize → op → quantize`` patterns become integer ``qgraph_ref`` ops.

A converted graph computes every quantized op in float between a dequantize and a
quantize::

    x_q ─ dq ─┐
    w_q ─ dq ─┼─ conv2d ─ relu ─ q ─→ y_q           (bias: int32 ─ dq, or float)
    b   ──────┘

Here the whole pattern becomes one integer kernel of :mod:`qgraph.ops.reference`::

    y_q = qgraph_ref.conv(x_q, s_x, zp_x, w_q, s_w, zp_w, b_q, ..., s_y, zp_y,
                          out_min=q(0), out_max=qmax, int8, runtime)

with the arithmetic of ``runtime`` (``"xnnpack"`` or ``"onnxruntime"``). The quantize of a
float tensor (the model input, or the end of a float island) becomes
``qgraph_ref.quantize`` with the runtime's rounding; dequantizes stay: the graph still
outputs float. Ops with no integer rule (layer norm, softmax: left float by the backend)
keep their ``dq → op → q`` form, so a lowered graph always runs.

The patterns are a table (:data:`LOWERINGS`, in :mod:`qgraph.passes.lower.reference_patterns`):
anchor ops, and a function that builds the integer node from the anchor's integer inputs,
or returns the reason it cannot. A fused
ReLU / ReLU6 between the anchor and the quantize narrows ``[out_min, out_max]`` to the
quantized bounds ``rne(fl(fl(v / s) + zp))`` (how XNNPACK quantizes an activation's
limits). A float bias (XNNPACK backend) is quantized here as ExecuTorch's XNNPACK
serializer does: ``round(b · fl(1 / fl(s_w · fl(s_x))))`` to int32.

Each new node records where it came from in ``node.meta["qgraph_reference"]``
(:class:`LoweredFrom`: the quantize node it replaced, the pattern and the anchor), which
:func:`qgraph.check` uses to line layers up across forms. Why a quantize node was lowered
as a plain quantize instead of a pattern is kept in ``LowerReference.skipped``.

Dynamically quantized layers (``choose_qparams`` → ``quantize_per_tensor.tensor`` /
``*_per_token``, with per-channel or per-group int4 weights) have no constant-qparam
quantize to anchor on: :class:`~qgraph.passes.lower.lower_dynamic_reference.LowerDynamicReference`
lowers them, and :func:`qgraph.lower` runs both passes.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.graph import copy_provenance, is_op, remove_dead_nodes, single_user
from qgraph.core.meta import REFERENCE_KEY, LoweredFrom
from qgraph.core.pass_manager import PassResult
from qgraph.ops.qdq import qd
from qgraph.passes.lower.reference_patterns import (
    ACTIVATIONS,
    LOWERINGS,
    Builder,
    Lowering,
    Output,
    RuntimeLowering,
    activation_bounds,
    quantize_bound,
)

ref = torch.ops.qgraph_ref





class LowerReference(RuntimeLowering):
    """Rewrite a converted Q/DQ graph into ``qgraph_ref`` integer ops with ``runtime``'s rounding."""

    name = "lower_reference"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self.skipped = {}
        lowered = 0
        for quant in list(gm.graph.nodes):
            if not is_op(quant, (qd.quantize_per_tensor.default,)) or not isinstance(quant.args[1], (float, int)):
                continue
            new, pattern, anchor = self._lower(gm, quant)
            new.meta[REFERENCE_KEY] = LoweredFrom(quant.name, pattern, anchor.name)
            if isinstance(quant.meta.get("val"), torch.Tensor):
                new.meta["val"] = quant.meta["val"]
            quant.replace_all_uses_with(new)
            gm.graph.erase_node(quant)
            lowered += 1
        if lowered:
            remove_dead_nodes(gm)
        return PassResult(gm, lowered > 0)

    def _lower(self, gm: torch.fx.GraphModule, quant: torch.fx.Node):
        src = quant.args[0]
        _, scale, zp, qmin, qmax, dtype = quant.args[:6]
        out = Output(float(scale), int(zp), int(qmin), int(qmax), dtype)
        anchor, act = src, None
        if is_op(src, ACTIVATIONS) and single_user(src) is quant:
            inner = src.args[0]
            fusable = any(is_op(inner, low.ops) and low.fuses_activation for low in LOWERINGS)
            if fusable and single_user(inner) is src:
                anchor, act = inner, src
        if act is not None or is_op(src, ACTIVATIONS):
            lo, hi = activation_bounds(act if act is not None else src)
            out = Output(out.scale, out.zero_point, max(out.qmin, quantize_bound(lo, out)),
                          min(out.qmax, quantize_bound(hi, out)), out.dtype)
        reason = "the quantized value is computed in float (no integer pattern)"
        for low in LOWERINGS:
            if not is_op(anchor, low.ops):
                continue
            with gm.graph.inserting_before(quant):
                built = low.build(Builder(self.name, self.runtime, gm, quant, anchor), out)
            if isinstance(built, torch.fx.Node):
                name = low.name + (f"_{str(act.target).split('.')[1].rstrip('_')}" if act is not None else "")
                return built, name, anchor
            reason = f"{low.name}: {built}"
            break
        self.skipped[quant.name] = reason
        with gm.graph.inserting_before(quant):
            node = gm.graph.call_function(
                ref.quantize.default, (src, float(scale), int(zp), int(qmin), int(qmax), dtype, self.runtime)
            )
        copy_provenance(node, quant, self.name)
        return node, "quantize", quant


__all__ = ["LowerReference", "Lowering", "LOWERINGS"]
