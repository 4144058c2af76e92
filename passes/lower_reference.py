"""Lower reference: ``dequantize → op → quantize`` patterns become integer ``qgraph_ref`` ops.

A converted graph computes every quantized op in float between a dequantize and a
quantize::

    x_q ─ dq ─┐
    w_q ─ dq ─┼─ conv2d ─ relu ─ q ─→ y_q           (bias: int32 ─ dq, or float)
    b   ──────┘

Here the whole pattern becomes one integer kernel of :mod:`qgraph.reference_ops`::

    y_q = qgraph_ref.conv(x_q, s_x, zp_x, w_q, s_w, zp_w, b_q, ..., s_y, zp_y,
                          out_min=q(0), out_max=qmax, int8, runtime)

with the arithmetic of ``runtime`` (``"xnnpack"`` or ``"onnxruntime"``). The quantize of a
float tensor (the model input, or the end of a float island) becomes
``qgraph_ref.quantize`` with the runtime's rounding; dequantizes stay: the graph still
outputs float. Ops with no integer rule (layer norm, softmax: left float by the backend)
keep their ``dq → op → q`` form, so a lowered graph always runs.

The patterns are a table (:data:`LOWERINGS`): anchor ops, and a function that builds the
integer node from the anchor's integer inputs, or returns the reason it cannot. A fused
ReLU / ReLU6 between the anchor and the quantize narrows ``[out_min, out_max]`` to the
quantized bounds ``rne(fl(fl(v / s) + zp))`` (how XNNPACK quantizes an activation's
limits). A float bias (XNNPACK backend) is quantized here as ExecuTorch's XNNPACK
serializer does: ``round(b · fl(1 / fl(s_w · fl(s_x))))`` to int32.

Each new node records where it came from in ``node.meta["qgraph_reference"]``
(:class:`LoweredFrom`: the quantize node it replaced, the pattern and the anchor), which
:func:`qgraph.check` uses to line layers up across forms. Why a quantize node was lowered
as a plain quantize instead of a pattern is kept in ``LowerReference.skipped``.

Not lowered yet (left in their Q/DQ form, so the model still computes the same):
dynamically quantized layers (``choose_qparams`` → ``quantize_per_tensor.tensor`` /
``*_per_token``: a reference kernel would add the runtime's own choice of per-batch
qparams, e.g. XNNPACK's ``qd8`` rows) and per-group int4 weights (``w_scale`` of shape
``[C_out, groups]``: :func:`qgraph.reference_ops._weight_offsets` and the multiplier are
the places to extend). Each is one more :class:`Lowering` entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx

from qgraph.graph import CONV_OPS, HARDTANH_OPS, LINEAR_OPS, RELU_OPS, add_constant, copy_provenance, get_constant
from qgraph.graph import is_op, remove_dead_nodes, single_user
from qgraph.pass_manager import Pass, PassResult
from qgraph.qdq_ops import QUANTIZE_OPS, qd
from qgraph.reference_ops import RUNTIMES, f32

aten = torch.ops.aten
ref = torch.ops.qgraph_ref

REFERENCE_KEY = "qgraph_reference"
"""``node.meta`` key of :class:`LoweredFrom` on every node the pass creates for a pattern."""


@dataclass(frozen=True)
class LoweredFrom:
    """What an integer node replaced: the quantize node (its name in the converted graph),
    the pattern (``conv_relu``, ``add``, ``quantize``, ...) and the anchor op's node name."""

    quantize: str
    pattern: str
    anchor: str


@dataclass(frozen=True)
class _IntInput:
    """An integer tensor and the per-tensor qparams a dequantize gave it."""

    node: torch.fx.Node
    scale: float
    zero_point: int


@dataclass(frozen=True)
class _Output:
    """The quantize node's qparams, with the clamp of a fused activation."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    dtype: torch.dtype

    def tail(self) -> tuple:
        return (self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)


ACTIVATIONS = RELU_OPS | HARDTANH_OPS
SHAPE_OPS = frozenset(
    {
        aten.flatten.using_ints,
        aten.reshape.default,
        aten.view.default,
        aten.permute.default,
        aten.transpose.int,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.unsqueeze.default,
        aten.contiguous.default,
        aten.clone.default,
    }
)


def _activation_bounds(act: torch.fx.Node) -> tuple[float, float]:
    if is_op(act, RELU_OPS):
        return 0.0, float("inf")
    lo = act.args[1] if len(act.args) > 1 else act.kwargs.get("min_val", -1.0)
    hi = act.args[2] if len(act.args) > 2 else act.kwargs.get("max_val", 1.0)
    return float(lo), float(hi)


def _quantize_bound(value: float, out: _Output) -> int:
    """``lrintf(fl(fl(v / s) + zp))`` clamped to the dtype: XNNPACK's quantized activation limit."""
    if value in (float("inf"), float("-inf")):
        return out.qmax if value > 0 else out.qmin
    q = torch.round(f32(value) / f32(out.scale) + f32(float(out.zero_point)))
    return int(q.clamp(out.qmin, out.qmax).item())


class _Builder:
    """Per-pattern context: the graph, the runtime and helpers to read integer inputs."""

    def __init__(self, pass_: "LowerReference", gm: torch.fx.GraphModule, quant: torch.fx.Node, anchor: torch.fx.Node):
        self.pass_ = pass_
        self.gm = gm
        self.graph = gm.graph
        self.quant = quant
        self.anchor = anchor
        self.runtime = pass_.runtime

    def int_input(self, node: object) -> _IntInput | None:
        if is_op(node, (qd.dequantize_per_tensor.default,)) and isinstance(node.args[1], (float, int)):
            return _IntInput(node.args[0], float(node.args[1]), int(node.args[2]))
        return None

    def call(self, op, args: tuple, kwargs: dict | None = None) -> torch.fx.Node:
        node = self.graph.call_function(op, args, kwargs)
        copy_provenance(node, self.anchor, LowerReference.name)
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

    def bias(self, node: object, x: _IntInput, w_scale: torch.fx.Node):
        """An int32 bias node (or None): taken from an int32 dequantize, or quantized from a
        float constant with ``scale = s_w · fl(s_x)`` as ExecuTorch's XNNPACK serializer does."""
        if node is None:
            return None
        if is_op(node, (qd.dequantize_per_channel.default, qd.dequantize_per_tensor.default)):
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


Build = Callable[[_Builder, _Output], "torch.fx.Node | str"]


def _inputs(b: _Builder, nodes) -> list[_IntInput] | str:
    out = []
    for n in nodes:
        i = b.int_input(n)
        if i is None:
            return f"input '{getattr(n, 'name', n)}' is not a dequantized integer tensor"
        out.append(i)
    return out


def _build_conv(b: _Builder, out: _Output):
    a = b.anchor
    x = b.int_input(a.args[0])
    w = b.weight(a.args[1])
    if x is None or w is None:
        return "input or weight is not dequantized from integers (per-channel weights on axis 0)"
    w_int, w_scale, w_zp = w
    bias = b.bias(a.args[2] if len(a.args) > 2 else None, x, w_scale)
    if isinstance(bias, str):
        return bias
    dims = a.meta["val"].dim() - 2 if isinstance(a.meta.get("val"), torch.Tensor) else 2
    stride = list(a.args[3]) if len(a.args) > 3 else [1] * dims
    padding = a.args[4] if len(a.args) > 4 else [0] * dims
    if isinstance(padding, str):
        return f"padding={padding!r} (string padding) has no integer form here"
    dilation = list(a.args[5]) if len(a.args) > 5 else [1] * dims
    groups = a.args[6] if len(a.args) > 6 else 1
    args = (x.node, x.scale, x.zero_point, w_int, w_scale, w_zp, bias, stride, list(padding), dilation, groups)
    return b.call(ref.conv.default, (*args, *out.tail(), b.runtime))


def _build_linear(b: _Builder, out: _Output):
    a = b.anchor
    x = b.int_input(a.args[0])
    w = b.weight(a.args[1])
    if x is None or w is None:
        return "input or weight is not dequantized from integers (per-channel weights on axis 0)"
    w_int, w_scale, w_zp = w
    bias = b.bias(a.args[2] if len(a.args) > 2 else None, x, w_scale)
    if isinstance(bias, str):
        return bias
    return b.call(ref.linear.default, (x.node, x.scale, x.zero_point, w_int, w_scale, w_zp, bias, *out.tail(), b.runtime))


def _binary(op) -> Build:
    def build(b: _Builder, out: _Output):
        if b.anchor.kwargs.get("alpha", 1) != 1 or (len(b.anchor.args) > 2 and b.anchor.args[2] != 1):
            return "add with alpha != 1"
        ins = _inputs(b, b.anchor.args[:2])
        if isinstance(ins, str):
            return ins
        (x, y) = ins
        return b.call(op, (x.node, x.scale, x.zero_point, y.node, y.scale, y.zero_point, *out.tail(), b.runtime))

    return build


def _build_cat(b: _Builder, out: _Output):
    ins = _inputs(b, b.anchor.args[0])
    if isinstance(ins, str):
        return ins
    dim = b.anchor.args[1] if len(b.anchor.args) > 1 else 0
    nodes = [i.node for i in ins]
    return b.call(ref.cat.default, (nodes, [i.scale for i in ins], [i.zero_point for i in ins], dim, *out.tail(), b.runtime))


def _unary(build_args: Callable[[torch.fx.Node], "tuple | str"], op) -> Build:
    """An op with one quantized input; ``build_args(anchor)`` gives its arguments after the input's qparams."""

    def build(b: _Builder, out: _Output):
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


def _build_max_pool(b: _Builder, out: _Output):
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


def _requantize_if_needed(b: _Builder, node: torch.fx.Node, x: _IntInput, out: _Output) -> torch.fx.Node:
    """Pass-through ops share qparams; only a different output qparam or a clamp needs work."""
    info = torch.iinfo(out.dtype)
    same = f32(x.scale) == f32(out.scale) and x.zero_point == out.zero_point
    if same and (out.qmin, out.qmax) == (info.min, info.max):
        return node
    return b.call(ref.requantize.default, (node, x.scale, x.zero_point, *out.tail(), b.runtime))


def _build_shape(b: _Builder, out: _Output):
    a = b.anchor
    x = b.int_input(a.args[0])
    if x is None:
        return "input is not a dequantized integer tensor"
    moved = b.call(a.target, (x.node, *a.args[1:]), dict(a.kwargs))
    return _requantize_if_needed(b, moved, x, out)


def _build_activation(b: _Builder, out: _Output):
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
    Lowering("matmul", frozenset({aten.matmul.default, aten.bmm.default}), _binary(ref.matmul.default)),
    Lowering("add", frozenset({aten.add.Tensor, aten.add_.Tensor}), _binary(ref.add.default)),
    Lowering("mul", frozenset({aten.mul.Tensor, aten.mul_.Tensor}), _binary(ref.mul.default)),
    Lowering("cat", frozenset({aten.cat.default, aten.concat.default}), _build_cat, False),
    Lowering("hardswish", frozenset({aten.hardswish.default, aten.hardswish_.default}), _unary(lambda a: (), ref.hardswish.default), False),
    Lowering("max_pool", frozenset({aten.max_pool2d.default, aten.max_pool1d.default}), _build_max_pool, False),
    Lowering("avg_pool", frozenset({aten.avg_pool2d.default, aten.avg_pool1d.default}), _unary(_avg_pool_args, ref.avg_pool.default), False),
    Lowering("adaptive_avg_pool2d", frozenset({aten.adaptive_avg_pool2d.default}), _unary(lambda a: (list(a.args[1]),), ref.adaptive_avg_pool2d.default), False),
    Lowering("mean", frozenset({aten.mean.dim, aten.mean.default}), _unary(_mean_args, ref.mean.default), False),
    Lowering("shape", SHAPE_OPS, _build_shape, False),
    Lowering("activation", ACTIVATIONS, _build_activation, False),
)
"""The integer form of each quantized pattern; adding an op is one entry (and one kernel)."""


class LowerReference(Pass):
    """Rewrite a converted Q/DQ graph into ``qgraph_ref`` integer ops with ``runtime``'s rounding."""

    name = "lower_reference"

    def __init__(self, runtime: str = "xnnpack") -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime={runtime!r} is not known; choose one of {RUNTIMES}")
        self.runtime = runtime
        self.skipped: dict[str, str] = {}

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
        out = _Output(float(scale), int(zp), int(qmin), int(qmax), dtype)
        anchor, act = src, None
        if is_op(src, ACTIVATIONS) and single_user(src) is quant:
            inner = src.args[0]
            fusable = any(is_op(inner, low.ops) and low.fuses_activation for low in LOWERINGS)
            if fusable and single_user(inner) is src:
                anchor, act = inner, src
        if act is not None or is_op(src, ACTIVATIONS):
            lo, hi = _activation_bounds(act if act is not None else src)
            out = _Output(out.scale, out.zero_point, max(out.qmin, _quantize_bound(lo, out)),
                          min(out.qmax, _quantize_bound(hi, out)), out.dtype)
        reason = "the quantized value is computed in float (no integer pattern)"
        for low in LOWERINGS:
            if not is_op(anchor, low.ops):
                continue
            with gm.graph.inserting_before(quant):
                built = low.build(_Builder(self, gm, quant, anchor), out)
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


__all__ = ["LowerReference", "LoweredFrom", "Lowering", "LOWERINGS", "REFERENCE_KEY"]
