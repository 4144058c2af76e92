"""LowerReference: converted ``dq → op → q`` patterns become ``qgraph_ref`` integer ops.

Structure is checked by op object; numerics against the converted (float) graph. Per
layer, fed the same integer inputs, an integer kernel and the float op + quantize differ
only where the float graph's own rounding (float32 accumulation, float bias) moves a value
across a rounding boundary: at most one step, on a tiny share of elements. End to end on
this three-layer-deep model those rare steps may add up to two.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qgraph
from qgraph import ConfigError
from qgraph.api.lower import lower
from qgraph.core.meta import REFERENCE_KEY, LoweredFrom
from qgraph.demo import output_scale
from qgraph.ops.qdq import qd
from qgraph.passes.lower.lower_reference import LowerReference
from qgraph.tools.check import _isolated, _places, _with_quantized_outputs
from tests.conftest import count_ops

aten = torch.ops.aten
ref = torch.ops.qgraph_ref


class EveryOp(nn.Module):
    """conv+BN+ReLU, depthwise conv+ReLU6, grouped conv, residual add+ReLU, cat, hardswish,
    max-pool, global average pool, linear and mul: one of each quantized pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        z = nn.functional.hardtanh(self.dw(y), 0.0, 6.0)
        z = torch.relu(self.grouped(z) + y)
        w = nn.functional.hardswish(torch.cat([z, y], 1))
        w = nn.functional.adaptive_avg_pool2d(nn.functional.max_pool2d(w, 2), 1).flatten(1)
        return self.fc(w) * self.fc(w)


def _converted(backend: str):
    torch.manual_seed(0)
    model = EveryOp().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    p = qgraph.prepare_ptq(model, (x,), backend=backend)
    qgraph.calibrate(p, [torch.randn(4, 3, 8, 8, generator=g) * 2 for _ in range(2)], progress=False)
    return qgraph.convert(p), x


@pytest.fixture(scope="module", params=["xnnpack", "x86"])
def converted(request):
    return _converted(request.param)


def test_every_pattern_becomes_one_integer_op(converted):
    q, x = converted
    result = LowerReference("xnnpack")(_copy(q))
    gm = result.graph_module
    gm.graph.lint()
    ops = count_ops(gm)
    assert result.modified
    assert ops[ref.conv.default] == 3 and ops[ref.linear.default] == 2
    assert ops[ref.add.default] == ops[ref.mul.default] == ops[ref.cat.default] == 1
    assert ops[ref.hardswish.default] == ops[ref.max_pool.default] == ops[ref.adaptive_avg_pool2d.default] == 1
    assert ops[ref.quantize.default] == 1  # the float input
    assert ops[aten.flatten.using_ints] == 1  # a shape op runs on the integers as it is
    float_ops = {aten.conv2d.default, aten.linear.default, aten.add.Tensor, aten.relu.default, aten.hardtanh.default}
    assert not float_ops & set(ops)
    assert ops[qd.quantize_per_tensor.default] == 0 and ops[qd.dequantize_per_channel.default] == 0
    assert ops[qd.dequantize_per_tensor.default] == 1  # only the output is dequantized


def test_fused_activations_clamp_and_patterns_are_recorded(converted):
    q, _ = converted
    gm = LowerReference("xnnpack")(_copy(q)).graph_module
    records = {n.name: n.meta[REFERENCE_KEY] for n in gm.graph.nodes if REFERENCE_KEY in n.meta}
    patterns = [r.pattern for r in records.values()]
    assert patterns.count("conv_relu") == 1 and patterns.count("conv_hardtanh") == 1 and "add_relu" in patterns
    quantize_names = {n.name for n in q.graph.nodes if n.target == qd.quantize_per_tensor.default}
    assert {r.quantize for r in records.values()} == quantize_names  # every quantized tensor, once
    relu_conv = next(n for n in gm.graph.nodes if REFERENCE_KEY in n.meta and n.meta[REFERENCE_KEY].pattern == "conv_relu")
    out_zp, out_min = relu_conv.args[12], relu_conv.args[13]
    assert out_min == out_zp  # ReLU: nothing below the code of 0.0
    assert relu_conv.meta["nn_module_stack"] and relu_conv.meta.get("stack_trace")  # provenance of the conv
    assert isinstance(relu_conv.meta[REFERENCE_KEY], LoweredFrom)


def test_int32_biases_are_used_as_they_are_and_float_biases_quantized(converted):
    q, _ = converted
    gm = LowerReference("onnxruntime")(_copy(q)).graph_module
    for conv in (n for n in gm.graph.nodes if n.target == ref.conv.default):
        bias = gm.get_buffer(conv.args[6].target)
        assert bias.dtype == torch.int32
    backend = q.meta["qgraph_converted"]["backend"]
    names = [str(n.args[6].target) for n in gm.graph.nodes if n.target == ref.conv.default]
    if backend == "x86":  # the int32 buffers convert made, no new constant
        assert all(name in dict(q.named_buffers()) for name in names)
    else:
        assert not any(name in dict(q.named_buffers()) for name in names)


@pytest.mark.parametrize("runtime", ["xnnpack", "onnxruntime"])
def test_numerics_against_the_converted_graph(converted, runtime):
    q, x = converted
    gm = LowerReference(runtime)(_copy(q)).graph_module
    gm.recompile()
    places = _places(q)
    exposed, n_out = _with_quantized_outputs(q, [p.name for p in places])
    with torch.no_grad():
        outs = exposed(x)
        y_ref, y_q = gm(x), outs[0]
    codes = {p.name: v.to(torch.int64) for p, v in zip(places, outs[n_out:])}
    # Fed the converted graph's integers, each kernel is within one step of the float op.
    isolated = _isolated(gm, (x,), codes, places)
    assert len(isolated) == len(places) and max(steps for steps, _ in isolated.values()) <= 1
    assert min(same for _, same in isolated.values()) >= 0.9  # the ≤ 1-step cases are rare
    assert (y_ref - y_q).abs().max().item() <= 2 * output_scale(q) * (1 + 1e-3)


def test_modified_only_when_something_was_lowered(converted):
    q, _ = converted
    once = LowerReference("xnnpack")(_copy(q)).graph_module
    again = LowerReference("xnnpack")(once)
    assert not again.modified


def test_float_islands_stay_float_with_a_reason():
    class WithSoftmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc2(torch.softmax(self.fc1(x), -1))

    torch.manual_seed(0)
    x = torch.randn(3, 8)
    p = qgraph.prepare_ptq(WithSoftmax().eval(), (x,))
    qgraph.calibrate(p, [x], progress=False)
    q = qgraph.convert(p)
    pass_ = LowerReference("xnnpack")
    gm = pass_(_copy(q)).graph_module
    ops = count_ops(gm)
    assert ops[ref.linear.default] == 2 and ops[aten._softmax.default] + ops[aten.softmax.int] == 1
    # the softmax output is quantized from float with the runtime's rounding
    assert ops[ref.quantize.default] == 2
    assert any("no integer pattern" in why for why in pass_.skipped.values())
    with torch.no_grad():
        assert (gm(x) - q(x)).abs().max().item() <= 2 * output_scale(q) * (1 + 1e-3)


def test_lower_api_picks_the_backend_runtime_and_refuses_bad_input(converted):
    q, x = converted
    backend = q.meta["qgraph_converted"]["backend"]
    lowered = lower(q)
    assert lowered.meta["qgraph_lowered"]["runtime"] == ("onnxruntime" if backend == "x86" else "xnnpack")
    conv = next(n for n in lowered.graph.nodes if n.target == ref.conv.default)
    assert conv.args[-1] == lowered.meta["qgraph_lowered"]["runtime"]
    assert lower(q, target="x86").meta["qgraph_lowered"]["runtime"] == "onnxruntime"
    assert any(n.target == qd.quantize_per_tensor.default for n in q.graph.nodes)  # q untouched
    with pytest.raises(ConfigError, match="choose one of"):
        lower(q, target="tflite")
    with pytest.raises(ConfigError, match="qgraph.convert"):
        lower(torch.fx.symbolic_trace(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="runtime='gpu' is not known"):
        LowerReference("gpu")


def _copy(gm):
    from qgraph.core.graph import copy_graph_module

    return copy_graph_module(gm)


def test_dynamic_layers_keep_their_qdq_form():
    """Dynamically quantized layers (qparams chosen per batch) have no reference kernel yet:
    the pass leaves them as they are, so the lowered model computes exactly the same."""
    from qgraph.recipes.dynamic import quantize_dynamic

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    q = quantize_dynamic(model, (x,))
    result = LowerReference("xnnpack")(_copy(q))
    assert not result.modified
    result.graph_module.recompile()
    assert count_ops(result.graph_module)[aten.linear.default] == 2
    assert torch.equal(result.graph_module(x), q(x))
