"""qgraph.tools.check: every form of a model on the same inputs, compared tensor by tensor.

The runtime forms (.pte, .onnx) are exercised in tests/test_conformance.py; here the
in-process forms, the report and the errors.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import qgraph
from qgraph import ConfigError
from qgraph.backends.rules.xnnpack import xnnpack_scheme
from qgraph.ops.qdq import qd
from qgraph.quant.specs import Int32Bias
from qgraph.tools.check import CheckReport, check
from tests.conftest import x86_qat_two_steps


@pytest.fixture
def ptq(conv_bn_net, image_batch):
    p = qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    qgraph.calibrate(p, [image_batch, image_batch * 2], progress=False)
    return p, qgraph.convert(p), image_batch


def _conv2_quantize(q) -> torch.fx.Node:
    """The quantize after conv2 → relu."""
    relu = next(n for n in q.graph.nodes if n.op == "call_function" and "relu" in str(n.target)
                and n.args[0].meta.get("nn_module_stack") and "conv2" in str(n.args[0].meta["nn_module_stack"]))
    return next(iter(relu.users))


def test_a_wrong_scale_is_found_at_its_layer(ptq, capsys):
    p, q, x = ptq
    bad = copy.deepcopy(q)
    node = _conv2_quantize(bad)
    assert node.target == qd.quantize_per_tensor.default
    node.update_arg(1, node.args[1] * 0.25)  # requantize conv2 with a scale 4× too small
    bad.recompile()
    # Tolerance 1: float and integer forms may legitimately differ by one step at a tie.
    report = check(p, bad, x, targets=("fake_quant", "reference"), tolerance=1)
    first = report.first_disagreement
    assert first is not None and first.name == node.name
    assert first.pattern == "conv_relu" and first.module == "conv2"
    assert ("fake_quant", "converted") in report.disagreeing_pairs(first)
    assert first.steps[("fake_quant", "converted")] >= 10  # 4× the codes: tens of steps, not a tie
    # The integer form follows the (wrong) graph. XNNPACK quantizes the float bias to int32; on
    # a grid 4× too fine that rounding is worth up to 4 × 0.5 · s_x·s_w/s_y steps: ≤ 2 here.
    assert first.steps[("converted", "reference")] <= 2
    earlier = [r for r in report.rows if r.index < first.index]
    assert earlier and all(r.worst <= 1 for r in earlier)
    printed = capsys.readouterr().out
    assert f"first disagreement: #{first.index} {node.name} (conv_relu, module 'conv2')" in printed


@pytest.mark.parametrize("int32_bias", [False, True])
def test_a_right_model_agrees_everywhere(conv_bn_net, image_batch, capsys, int32_bias):
    config = None
    if int32_bias:
        config = qgraph.QConfig(scheme=dataclasses.replace(xnnpack_scheme(), bias=Int32Bias()))
    p = qgraph.prepare_ptq(conv_bn_net, (image_batch,), config=config)
    qgraph.calibrate(p, [image_batch, image_batch * 2], progress=False)
    q = qgraph.convert(p)
    report = check(p, q, image_batch, targets=("fake_quant", "reference"), tolerance=1, verbose=False)
    assert isinstance(report, CheckReport) and capsys.readouterr().out == ""
    assert report.first_disagreement is None
    assert report.forms == ("fake_quant", "converted", "reference")
    assert len(report.rows) == sum(1 for n in q.graph.nodes if n.target == qd.quantize_per_tensor.default)
    # fake-quant in eval and convert share qparams and constants: identical codes
    assert all(r.steps[("fake_quant", "converted")] == 0 for r in report.rows)
    identical = min(r.identical[("converted", "reference")] for r in report.rows)
    if int32_bias:
        # the float graph holds the very int32 bias the integer kernel adds: only float32
        # accumulation order differs (measured: every code identical)
        assert identical >= 0.999
    else:
        # XNNPACK's default float bias is rounded to int32 only in the integer forms: up to half
        # a step of s_x·s_w apart (measured here: 93.3 % of the output codes identical)
        assert identical >= 0.9
    assert report.outputs and report.outputs[0].scale is not None
    assert "all forms agree within 1 step(s)" in report.to_text()
    assert report[report.rows[1].name] is report.rows[1]


def test_qat_fake_quant_form(conv_bn_net, image_batch):
    p = x86_qat_two_steps(conv_bn_net, image_batch)
    q = qgraph.convert(p)
    report = check(p, q, image_batch, targets=("fake_quant", "reference"), verbose=False)
    assert report.target == "x86"
    # int32 biases in both forms, integer-exact reference: everything identical
    assert report.first_disagreement is None


def test_errors_name_what_to_do(ptq):
    p, q, x = ptq
    with pytest.raises(ConfigError, match="prepared model"):
        check(None, q, x)
    with pytest.raises(ConfigError, match="unknown form"):
        check(p, q, x, targets=("tflite",))
    with pytest.raises(ConfigError, match="qgraph.convert"):
        check(p, p, x, targets=("reference",))
    with pytest.raises(ConfigError, match="choose one of"):
        check(p, q, x, targets=("reference",), target="gpu")
