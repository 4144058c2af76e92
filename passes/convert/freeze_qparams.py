"""Freeze qparams: observer / fake-quant calls become quantize → dequantize ops.

Each quantizer call ``q = module(x)`` becomes::

    xq = quantized_decomposed.quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype)
    dq_i = quantized_decomposed.dequantize_per_tensor(xq, ...)     # one per user of q

(``*_per_channel`` with scale and zero-point tensors for per-channel specs,
``*_per_channel_group`` with ``[rows, cols // group_size]`` scales for per-group ones). These are the
ops ExecuTorch's XNNPACK partitioner and the ONNX exporter turn into integer kernels. One
dequantize per user, as torchao's ``convert_pt2e`` does, so that a partitioner can take
each consumer with its own dequantize. A call of a module whose input is already the
output of the same module (left behind when a dropout between them was removed) is the
identity and is dropped. qparams come from ``module.qparams()``, the same function the
fake-quant used, so eval-mode fake-quant and the converted graph agree.

A dynamic quantizer becomes ``scale, zp = choose_qparams(x)`` followed by
``quantize_per_tensor.tensor`` / ``dequantize_per_tensor.tensor`` (``*_per_token`` per row)
that take those tensors: the range is that of each batch, chosen at run time — the form
ExecuTorch's XNNPACK partitioner delegates as dynamically quantized linear / conv. A weight
observer that saw no data (dynamic PTQ needs no calibration) observes its constant here.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from qgraph.core.errors import CalibrationError
from qgraph.core.graph import add_constant, copy_provenance, get_constant
from qgraph.core.node_info import describe_node
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.observers.base import QUANTIZER_TYPES, DerivedQuantizer, DynamicQuantizer, FakeQuantize, Observer
from qgraph.ops.qdq import dynamic_qdq_ops, dynamic_qparams_call, qd
from qgraph.quant.specs import PerGroup


def _is_constant(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def _quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node):
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(str(node.target))
    return mod if isinstance(mod, QUANTIZER_TYPES) else None


class FreezeQparams(Pass):
    name = "freeze_qparams"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self._retyped_vals: dict[tuple, torch.Tensor] = {}
        changed = False
        used_modules = set()
        for node in list(gm.graph.nodes):
            src = node.args[0] if node.args else None
            if _quantizer(gm, node) is not None and isinstance(src, torch.fx.Node) and src.target == node.target:
                node.replace_all_uses_with(src)  # same qparams twice in a row: the identity
                gm.graph.erase_node(node)
        for node in list(gm.graph.nodes):
            mod = _quantizer(gm, node)
            if mod is None:
                continue
            used_modules.add(str(node.target))
            changed = True
            if isinstance(mod, DynamicQuantizer):
                self._replace_dynamic(gm, node, mod.spec)
                continue
            src = node.args[0]
            if isinstance(mod, (Observer, FakeQuantize)) and not mod.has_range and _is_constant(src):
                mod._update_range(get_constant(gm, src))  # a weight needs no calibration data
            if not mod.has_range:
                raise CalibrationError(
                    f"quantizer '{node.target}' at {describe_node(node)} never saw data: "
                    "run qgraph.calibrate (PTQ) or train a few steps (QAT) before convert"
                )
            self._replace(gm, node, mod)
        still_called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        for name in used_modules - still_called:
            delattr(gm, name)
        return PassResult(gm, changed)

    def _retyped(self, val: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``val.to(dtype)``, one per distinct (shape, strides, device, dtype) in the graph.

        ``val`` is a fake tensor; making one costs a dispatch through its fake mode (about a
        millisecond), which a graph of thousands of quantizers would pay per quantizer. Meta
        values are read, never written, so nodes of the same metadata share one.
        """
        key = (id(getattr(val, "fake_mode", None)), str(val.shape), str(val.stride()), val.device, val.dtype, dtype)
        if key not in self._retyped_vals:
            self._retyped_vals[key] = val.to(dtype)
        return self._retyped_vals[key]

    def _replace(self, gm: torch.fx.GraphModule, node: torch.fx.Node, mod) -> None:
        scale, zero_point, qmin, qmax, dtype, axis = _frozen_qparams(mod)
        graph = gm.graph
        tail = (qmin, qmax, dtype)
        group = getattr(getattr(mod, "spec", None), "granularity", None)
        with graph.inserting_before(node):
            if isinstance(group, PerGroup):
                s = add_constant(gm, f"scale_{node.target}", scale.to(torch.float32), like=node)
                z = add_constant(gm, f"zero_point_{node.target}", zero_point.to(torch.int64), like=node)
                qparams = (s, z, *tail, group.group_size)
                quantize, dequantize = qd.quantize_per_channel_group.default, qd.dequantize_per_channel_group.default
            elif axis is not None:
                s = add_constant(gm, f"scale_{node.target}", scale.to(torch.float32), like=node)
                z = add_constant(gm, f"zero_point_{node.target}", zero_point.to(torch.int64), like=node)
                qparams = (s, z, axis, *tail)
                quantize, dequantize = qd.quantize_per_channel.default, qd.dequantize_per_channel.default
            else:
                qparams = (float(scale.item()), int(zero_point.item()), *tail)
                quantize, dequantize = qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default
            q = graph.call_function(quantize, (node.args[0], *qparams))
            copy_provenance(q, node, self.name)
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                q.meta["val"] = self._retyped(val, dtype)
        dq_args = (*qparams, torch.float32) if isinstance(group, PerGroup) else qparams  # + output dtype
        for user in list(node.users):
            with graph.inserting_before(user):
                dq = graph.call_function(dequantize, (q, *dq_args))
            copy_provenance(dq, node, self.name)
            dq.meta["val"] = val
            user.replace_input_with(node, dq)
        graph.erase_node(node)


    def _replace_dynamic(self, gm: torch.fx.GraphModule, node: torch.fx.Node, spec) -> None:
        """``choose_qparams → (scale, zp) → quantize → dequantize`` per user, qparams per batch."""
        graph = gm.graph
        choose, choose_args = dynamic_qparams_call(spec)
        quantize, q_args, dequantize, dq_args = dynamic_qdq_ops(spec)
        x = node.args[0]
        val = node.meta.get("val")
        with graph.inserting_before(node):
            qparams = graph.call_function(choose, (x, *choose_args))
            scale = graph.call_function(operator.getitem, (qparams, 0))
            zero_point = graph.call_function(operator.getitem, (qparams, 1))
            q = graph.call_function(quantize, (x, scale, zero_point, *q_args))
        for new in (qparams, scale, zero_point, q):
            copy_provenance(new, node, self.name)
        if isinstance(val, torch.Tensor):
            qparams.meta["val"] = choose(val, *choose_args)
            scale.meta["val"], zero_point.meta["val"] = qparams.meta["val"]
            q.meta["val"] = val.to(spec.dtype)
        for user in list(node.users):
            with graph.inserting_before(user):
                dq = graph.call_function(dequantize, (q, scale, zero_point, *dq_args))
            copy_provenance(dq, node, self.name)
            dq.meta["val"] = val
            user.replace_input_with(node, dq)
        graph.erase_node(node)


def _frozen_qparams(mod) -> tuple[torch.Tensor, torch.Tensor, int, int, torch.dtype, int | None]:
    """``(scale, zero_point, quant_min, quant_max, dtype, axis or None)`` of a quantizer."""
    scale, zero_point = mod.qparams()
    if isinstance(mod, DerivedQuantizer):
        axis = 0 if scale.numel() > 1 else None
        return scale, zero_point, mod.quant_min, mod.quant_max, mod.spec.dtype, axis
    spec = mod.spec
    axis = spec.granularity.axis if spec.is_per_channel else None
    return scale, zero_point, spec.quant_min, spec.quant_max, spec.dtype, axis
