"""The integer patterns of :class:`~qgraph.passes.lower.lower_reference.LowerReference`.

Each :class:`Lowering` names the anchor ops of a ``dequantize → op → quantize`` pattern and
a builder that, given the anchor's integer inputs (:class:`Builder`) and the quantize's
qparams (:class:`Output`), emits one ``qgraph_ref`` kernel — or returns, as a string, why
the pattern has no integer form (then the pass keeps it in float and says so).

Requantization bounds follow XNNPACK: a fused ReLU / ReLU6 clamps the output codes to
``rne(fl(fl(v / s) + zp))`` of its limits (:func:`quantize_bound`). A float bias is
quantized as ExecuTorch's XNNPACK serializer does: ``round(b · fl(1 / fl(s_w · fl(s_x))))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx

from qgraph.core.graph import add_constant, copy_provenance, get_constant, is_op
from qgraph.core.opsets import (
    ADAPTIVE_AVG_POOL_OPS,
    ADD_OPS,
    AVG_POOL_OPS,
    CAT_OPS,
    CONV_OPS,
    DATA_MOVEMENT_OPS,
    DEQUANTIZE_OPS,
    GROUP_QDQ_OPS,
    HARDSWISH_OPS,
    HARDTANH_OPS,
    LINEAR_OPS,
    MATMUL_OPS,
    MAX_POOL_OPS,
    MEAN_OPS,
    MUL_OPS,
    RELU_OPS,
)
from qgraph.core.pass_manager import Pass
from qgraph.ops.qdq import qd
from qgraph.ops.reference import RUNTIMES, f32

aten = torch.ops.aten
ref = torch.ops.qgraph_ref


@dataclass(frozen=True)
class IntInput:
    """An integer tensor and the per-tensor qparams a dequantize gave it."""

    node: torch.fx.Node
    scale: float
    zero_point: int


@dataclass(frozen=True)
class Output:
    """The quantize node's qparams, with the clamp of a fused activation."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    dtype: torch.dtype

    def tail(self) -> tuple:
        return (self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)


ACTIVATIONS = RELU_OPS | HARDTANH_OPS


def activation_bounds(act: torch.fx.Node) -> tuple[float, float]:
    if is_op(act, RELU_OPS):
        return 0.0, float("inf")
    lo = act.args[1] if len(act.args) > 1 else act.kwargs.get("min_val", -1.0)
    hi = act.args[2] if len(act.args) > 2 else act.kwargs.get("max_val", 1.0)
    return float(lo), float(hi)


def quantize_bound(value: float, out: Output) -> int:
    """``lrintf(fl(fl(v / s) + zp))`` clamped to the dtype: XNNPACK's quantized activation limit."""
    if value in (float("inf"), float("-inf")):
        return out.qmax if value > 0 else out.qmin
    q = torch.round(f32(value) / f32(out.scale) + f32(float(out.zero_point)))
    return int(q.clamp(out.qmin, out.qmax).item())


class Builder:
    """Per-pattern context: the graph, the runtime and helpers to read integer inputs."""

    def __init__(self, pass_name: str, runtime: str, gm: torch.fx.GraphModule, quant: torch.fx.Node, anchor: torch.fx.Node):
        self.pass_name = pass_name
        self.gm = gm
        self.graph = gm.graph
        self.quant = quant
        self.anchor = anchor
        self.runtime = runtime

    def int_input(self, node: object) -> IntInput | None:
        if is_op(node, (qd.dequantize_per_tensor.default,)) and isinstance(node.args[1], (float, int)):
            return IntInput(node.args[0], float(node.args[1]), int(node.args[2]))
        return None

    def call(self, op, args: tuple, kwargs: dict | None = None) -> torch.fx.Node:
        node = self.graph.call_function(op, args, kwargs)
        copy_provenance(node, self.anchor, self.pass_name)
        return node

    def constant(self, hint: str, value: torch.Tensor) -> torch.fx.Node:
        return add_constant(self.gm, hint, value, like=self.anchor)

    def weight(self, node: object):
        """``(int weight, scale tensor, zero-point tensor)`` of a dequantized constant weight."""
        if is_op(node, (qd.dequantize_per_channel.default,)):
            w, scale, zp, axis = node.args[:4]
            if axis != 0 or not all(isinstance(n, torch.fx.Node) and n.op == "get_attr" for n in (w, scale)):
                return None
            if zp is None:
                zp = self.constant("zero_point", torch.zeros(get_constant(self.gm, scale).shape, dtype=torch.int64))
            return w, scale, zp
        if is_op(node, (qd.dequantize_per_tensor.default,)) and isinstance(node.args[0], torch.fx.Node):
            w, scale, zp = node.args[:3]
            if node.args[0].op != "get_attr":
                return None
            return w, self.constant("scale", torch.tensor([float(scale)])), self.constant("zp", torch.tensor([int(zp)]))
        return None

    def bias(self, node: object, x: IntInput, w_scale: torch.fx.Node):
        """An int32 bias node (or None): taken from an int32 dequantize, or quantized from a
        float constant with ``scale = s_w · fl(s_x)`` as ExecuTorch's XNNPACK serializer does."""
        if node is None:
            return None
        if is_op(node, DEQUANTIZE_OPS - GROUP_QDQ_OPS):
            # the last positional argument of both dequantize ops is the integer dtype
            return node.args[0] if node.args[-1] == torch.int32 else "bias is dequantized from a non-int32 tensor"
        if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
            return "bias is computed, not a constant"
        b = get_constant(self.gm, node).detach().to(torch.float32)
        scale = get_constant(self.gm, w_scale).to(torch.float32).reshape(-1) * float(f32(x.scale))
        info = torch.iinfo(torch.int32)
        scale = scale.expand(b.shape[0]) if scale.numel() == 1 else scale
        q = qd.quantize_per_channel.default(b, scale, torch.zeros_like(scale, dtype=torch.int64), 0, info.min, info.max, torch.int32)
        return self.constant(f"{node.target}_int32", q)


Build = Callable[[Builder, Output], "torch.fx.Node | str"]


def _inputs(b: Builder, nodes) -> list[IntInput] | str:
    out = []
    for n in nodes:
        i = b.int_input(n)
        if i is None:
            return f"input '{getattr(n, 'name', n)}' is not a dequantized integer tensor"
        out.append(i)
    return out


def _weighted_operands(b: Builder):
    """``(x, w_int, w_scale, w_zp, int32 bias)`` of a conv / linear anchor, or why not."""
    a = b.anchor
    x = b.int_input(a.args[0])
    w = b.weight(a.args[1])
    if x is None or w is None:
        return "input or weight is not dequantized from integers (per-channel weights on axis 0)"
    bias = b.bias(a.args[2] if len(a.args) > 2 else None, x, w[1])
    return bias if isinstance(bias, str) else (x, *w, bias)


def _build_conv(b: Builder, out: Output):
    operands = _weighted_operands(b)
    if isinstance(operands, str):
        return operands
    x, w_int, w_scale, w_zp, bias = operands
    a = b.anchor
    dims = a.meta["val"].dim() - 2 if isinstance(a.meta.get("val"), torch.Tensor) else 2
    stride = list(a.args[3]) if len(a.args) > 3 else [1] * dims
    padding = a.args[4] if len(a.args) > 4 else [0] * dims
    if isinstance(padding, str):
        return f"padding={padding!r} (string padding) has no integer form here"
    dilation = list(a.args[5]) if len(a.args) > 5 else [1] * dims
    groups = a.args[6] if len(a.args) > 6 else 1
    args = (x.node, x.scale, x.zero_point, w_int, w_scale, w_zp, bias, stride, list(padding), dilation, groups)
    return b.call(ref.conv.default, (*args, *out.tail(), b.runtime))


def _build_linear(b: Builder, out: Output):
    operands = _weighted_operands(b)
    if isinstance(operands, str):
        return operands
    x, w_int, w_scale, w_zp, bias = operands
    return b.call(ref.linear.default, (x.node, x.scale, x.zero_point, w_int, w_scale, w_zp, bias, *out.tail(), b.runtime))


def _binary(op) -> Build:
    def build(b: Builder, out: Output):
        if b.anchor.kwargs.get("alpha", 1) != 1 or (len(b.anchor.args) > 2 and b.anchor.args[2] != 1):
            return "add with alpha != 1"
        ins = _inputs(b, b.anchor.args[:2])
        if isinstance(ins, str):
            return ins
        (x, y) = ins
        return b.call(op, (x.node, x.scale, x.zero_point, y.node, y.scale, y.zero_point, *out.tail(), b.runtime))

    return build


def _build_cat(b: Builder, out: Output):
    ins = _inputs(b, b.anchor.args[0])
    if isinstance(ins, str):
        return ins
    dim = b.anchor.args[1] if len(b.anchor.args) > 1 else 0
    nodes = [i.node for i in ins]
    return b.call(ref.cat.default, (nodes, [i.scale for i in ins], [i.zero_point for i in ins], dim, *out.tail(), b.runtime))


def _unary(build_args: Callable[[torch.fx.Node], "tuple | str"], op) -> Build:
    """An op with one quantized input; ``build_args(anchor)`` gives its arguments after the input's qparams."""

    def build(b: Builder, out: Output):
        x = b.int_input(b.anchor.args[0])
        if x is None:
            return "input is not a dequantized integer tensor"
        extra = build_args(b.anchor)
        if isinstance(extra, str):
            return extra
        return b.call(op, (x.node, x.scale, x.zero_point, *extra, *out.tail(), b.runtime))

    return build


def _arg(node: torch.fx.Node, i: int, default):
    return node.args[i] if len(node.args) > i else default


def _as_list(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _build_max_pool(b: Builder, out: Output):
    a = b.anchor
    x = b.int_input(a.args[0])
    if x is None:
        return "input is not a dequantized integer tensor"
    n = 1 if a.target == aten.max_pool1d.default else 2
    kernel = _as_list(a.args[1], n)
    stride = _as_list(_arg(a, 2, []), n) if _arg(a, 2, []) else []
    args = (kernel, stride, _as_list(_arg(a, 3, 0), n), _as_list(_arg(a, 4, 1), n), bool(_arg(a, 5, False)))
    pooled = b.call(ref.max_pool.default, (x.node, *args))
    return _requantize_if_needed(b, pooled, x, out)


def _avg_pool_args(a: torch.fx.Node):
    if _arg(a, 6, None) is not None:
        return "avg_pool2d with divisor_override"
    n = 1 if a.target == aten.avg_pool1d.default else 2
    kernel = _as_list(a.args[1], n)
    stride = _as_list(_arg(a, 2, []), n) if _arg(a, 2, []) else []
    return (kernel, stride, _as_list(_arg(a, 3, 0), n), bool(_arg(a, 4, False)), bool(_arg(a, 5, True)))


def _mean_args(a: torch.fx.Node):
    if a.target == aten.mean.default:
        rank = a.args[0].meta["val"].dim()
        return (list(range(rank)), False)
    if _arg(a, 3, a.kwargs.get("dtype")) is not None:
        return "mean with a dtype"
    return (list(_arg(a, 1, [])), bool(_arg(a, 2, a.kwargs.get("keepdim", False))))


def _requantize_if_needed(b: Builder, node: torch.fx.Node, x: IntInput, out: Output) -> torch.fx.Node:
    """Pass-through ops share qparams; only a different output qparam or a clamp needs work."""
    info = torch.iinfo(out.dtype)
    same = f32(x.scale) == f32(out.scale) and x.zero_point == out.zero_point
    if same and (out.qmin, out.qmax) == (info.min, info.max):
        return node
    return b.call(ref.requantize.default, (node, x.scale, x.zero_point, *out.tail(), b.runtime))


def _build_shape(b: Builder, out: Output):
    a = b.anchor
    x = b.int_input(a.args[0])
    if x is None:
        return "input is not a dequantized integer tensor"
    moved = b.call(a.target, (x.node, *a.args[1:]), dict(a.kwargs))
    return _requantize_if_needed(b, moved, x, out)


def _build_activation(b: Builder, out: Output):
    """A ReLU / ReLU6 on its own (not fused): a clamp of the integers (``out`` carries it)."""
    x = b.int_input(b.anchor.args[0])
    if x is None:
        return "input is not a dequantized integer tensor"
    return b.call(ref.requantize.default, (x.node, x.scale, x.zero_point, *out.tail(), b.runtime))


@dataclass(frozen=True)
class Lowering:
    """One pattern: its anchor ops, whether a ReLU / ReLU6 may follow, and the builder."""

    name: str
    ops: frozenset
    build: Build
    fuses_activation: bool = True


LOWERINGS: tuple[Lowering, ...] = (
    Lowering("conv", CONV_OPS, _build_conv),
    Lowering("linear", LINEAR_OPS, _build_linear),
    Lowering("matmul", MATMUL_OPS, _binary(ref.matmul.default)),
    Lowering("add", ADD_OPS, _binary(ref.add.default)),
    Lowering("mul", MUL_OPS, _binary(ref.mul.default)),
    Lowering("cat", CAT_OPS, _build_cat, False),
    Lowering("hardswish", HARDSWISH_OPS, _unary(lambda a: (), ref.hardswish.default), False),
    Lowering("max_pool", MAX_POOL_OPS, _build_max_pool, False),
    Lowering("avg_pool", AVG_POOL_OPS, _unary(_avg_pool_args, ref.avg_pool.default), False),
    Lowering("adaptive_avg_pool2d", ADAPTIVE_AVG_POOL_OPS, _unary(lambda a: (list(a.args[1]),), ref.adaptive_avg_pool2d.default), False),
    Lowering("mean", MEAN_OPS, _unary(_mean_args, ref.mean.default), False),
    Lowering("shape", DATA_MOVEMENT_OPS, _build_shape, False),
    Lowering("activation", ACTIVATIONS, _build_activation, False),
)
"""The integer form of each quantized pattern; adding an op is one entry (and one kernel)."""


class RuntimeLowering(Pass):
    """A lowering to reference kernels with the arithmetic of ``runtime``; what it leaves in
    Q/DQ form, and why, is in ``skipped`` (node name → reason) after each call."""

    def __init__(self, runtime: str = "xnnpack") -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime={runtime!r} is not known; choose one of {RUNTIMES}")
        self.runtime = runtime
        self.skipped: dict[str, str] = {}
