"""Shift uint8 activations to int8: the same grid, 128 steps lower.

A uint8 affine quantizer and an int8 one with the zero point moved by 128 are the same
function of ``x``::

    clamp(round(x / s) + zp, 0, 255) - 128  ==  clamp(round(x / s) + (zp - 128), -128, 127)

and dequantizing either gives ``(q - zp) * s``, bit for bit. ExecuTorch's XNNPACK delegate
runs int8 (QS8) quantized kernels and rejects uint8 tensors, so the x86 scheme's uint8
activations are rewritten here before a ``.pte`` is emitted, and the program computes what
the converted reference does.

Rewritten: ``quantize_per_tensor`` / ``dequantize_per_tensor`` (constant qparams: ``zp -
128``), their ``.tensor`` forms and ``choose_qparams.tensor`` (dynamic qparams: the range
``[qmin, qmax]`` moves by -128, so the chosen scale is unchanged and the zero point moves
by -128). A uint8 constant that a dequantize reads (a parameter used as an activation,
e.g. ConvNeXt's ``layer_scale``) is replaced by its int8 copy. uint8 per-channel tensors
(never activations) are left as they are.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.graph import add_constant, get_constant, is_op, remove_dead_nodes
from qgraph.core.opsets import CHOOSE_PER_TENSOR_OPS, PER_TENSOR_DYNAMIC_QDQ_OPS, PER_TENSOR_QDQ_OPS
from qgraph.core.pass_manager import Pass, PassResult

SHIFT = 128


class ShiftUint8ToInt8(Pass):
    """Rewrite every uint8 per-tensor quantize / dequantize / choose_qparams to int8."""

    name = "shift_uint8_to_int8"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self._shifted: dict[torch.fx.Node, torch.fx.Node] = {}
        shifted = 0
        for node in gm.graph.nodes:
            if not is_op(node, PER_TENSOR_QDQ_OPS | PER_TENSOR_DYNAMIC_QDQ_OPS | CHOOSE_PER_TENSOR_OPS) or node.args[-1] != torch.uint8:
                continue
            args = list(node.args)
            if node.target in CHOOSE_PER_TENSOR_OPS:
                args[1], args[2] = args[1] - SHIFT, args[2] - SHIFT
            else:
                if node.target in PER_TENSOR_QDQ_OPS:
                    args[2] = int(args[2]) - SHIFT
                args[3], args[4] = args[3] - SHIFT, args[4] - SHIFT
            args[-1] = torch.int8
            if node.target in PER_TENSOR_QDQ_OPS and _is_constant(args[0]):
                args[0] = self._shifted_constant(gm, args[0])
            node.args = tuple(args)
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dtype == torch.uint8:
                node.meta["val"] = val.to(torch.int8)
            shifted += 1
        if self._shifted:
            remove_dead_nodes(gm)
        return PassResult(gm, shifted > 0)

    def _shifted_constant(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node:
        """A quantized constant read as an activation (ConvNeXt's ``layer_scale`` in a mul)
        holds uint8 codes: its int8 copy, 128 lower, shared by every dequantize of it."""
        if node in self._shifted:
            return self._shifted[node]
        codes = get_constant(gm, node)
        if codes.dtype != torch.uint8:
            return node
        with gm.graph.inserting_before(node):
            new = add_constant(gm, f"{node.target}_s8", (codes.to(torch.int16) - SHIFT).to(torch.int8), like=node)
        self._shifted[node] = new
        return new


def _is_constant(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"
