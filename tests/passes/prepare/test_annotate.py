"""Annotate: backend rules write specs; refusals are explained; strict mode errors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import qgraph
from qgraph import QConfig, UnsupportedOperatorError
from qgraph.backends.rules.xnnpack import XNNPACK
from qgraph.core.dump import DescribedGraph, format_node
from qgraph.core.meta import ANNOTATION_KEY, REFUSALS_KEY, RefusalKind
from qgraph.passes.prepare.annotate import Annotate
from qgraph.passes.prepare.fuse_conv_bn_qat import FuseConvBnQat
from qgraph.quant.rules import QuantScheme
from qgraph.quant.specs import PerGroup, QuantSpec, SharedSpec

aten = torch.ops.aten


def _annotated(model, x, config=None, is_qat=True, debug_node=None):
    gm = qgraph.capture(model, (x,))
    if is_qat:
        gm = FuseConvBnQat()(gm).graph_module
    result = Annotate(XNNPACK, is_qat=is_qat, config=config, debug_node=debug_node)(gm)
    result.graph_module.graph.lint()
    return result


def _by_target(gm, target):
    return [n for n in gm.graph.nodes if n.target == target]


def test_conv_bn_relu_is_one_pattern_with_output_after_relu(conv_bn_net, image_batch):
    result = _annotated(conv_bn_net.train(), image_batch)
    gm = result.graph_module
    assert result.modified
    conv = _by_target(gm, aten.conv2d.default)[0]
    relu = _by_target(gm, aten.relu.default)[0]
    ann = conv.meta[ANNOTATION_KEY]
    assert ann.rule == "conv_relu" and ann.output is None
    weight_spec = ann.inputs[conv.args[1].name]
    assert isinstance(weight_spec, QuantSpec) and weight_spec.symmetric and weight_spec.quant_min == -127
    assert relu.meta[ANNOTATION_KEY].output.quant_min == -128
    bn = _by_target(gm, aten.batch_norm.default)[0]
    assert bn.meta[ANNOTATION_KEY].anchor == conv.name  # folded into the pattern: no quantizer


def test_pass_through_ops_share_their_input_qparams(conv_bn_net, image_batch):
    gm = _annotated(conv_bn_net.train(), image_batch).graph_module
    pool = _by_target(gm, aten.max_pool2d.default)[0]
    ann = pool.meta[ANNOTATION_KEY]
    assert ann.inputs == {pool.args[0].name: SharedSpec(pool.args[0].name)}
    assert ann.output == SharedSpec((pool.args[0].name, pool.name))


def test_config_none_keeps_a_module_float_and_is_not_warned(conv_bn_net, image_batch, recwarn):
    gm = _annotated(conv_bn_net.train(), image_batch, QConfig().set_module_name("fc", None)).graph_module
    linear = _by_target(gm, aten.linear.default)[0]
    assert ANNOTATION_KEY not in linear.meta
    assert not [w for w in recwarn if "stays in float" in str(w.message)]
    assert [r.kind for r in linear.meta[REFUSALS_KEY]] == [RefusalKind.NOT_MATCHED, RefusalKind.CONFIG_FLOAT]
    # The dump line of the float layer says why, one "rule: reason" per refusal.
    assert "float: linear_relu: 'linear' is not followed by" in format_node(DescribedGraph(gm), linear)
    assert "; linear: the config keeps this node in float" in format_node(DescribedGraph(gm), linear)


def test_keep_first_last_float_is_a_config_refusal_and_is_not_warned(conv_bn_net, image_batch, recwarn):
    gm = _annotated(conv_bn_net.eval(), image_batch, QConfig(keep_first_last_float=True), is_qat=False).graph_module
    first, _, last = [n for n in gm.graph.nodes if n.target in (aten.conv2d.default, aten.linear.default)]
    for node in (first, last):
        assert ANNOTATION_KEY not in node.meta
        assert RefusalKind.CONFIG_FLOAT in {r.kind for r in node.meta[REFUSALS_KEY]}
    assert not [w for w in recwarn if "stays in float" in str(w.message)]


class _DynamicWeight(nn.Module):
    def forward(self, x, w):
        return torch.nn.functional.linear(x, w)


def test_unquantizable_linear_warns_and_strict_raises_naming_the_node(caplog):
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    gm = qgraph.capture(_DynamicWeight(), (x, w))
    with pytest.warns(UserWarning, match=r"'linear' .*stays in float.*weight is a graph input"):
        Annotate(XNNPACK, is_qat=False)(gm)
    gm = qgraph.capture(_DynamicWeight(), (x, w))
    with pytest.raises(UnsupportedOperatorError, match=r"'linear'.*QConfig.set_module_name"):
        Annotate(XNNPACK, is_qat=False, config=QConfig(strict=True))(gm)


def test_debug_node_logs_every_refusing_rule(caplog):
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    gm = qgraph.capture(_DynamicWeight(), (x, w))
    with caplog.at_level(logging.WARNING, logger="qgraph.annotate"), pytest.warns(UserWarning):
        Annotate(XNNPACK, is_qat=False, debug_node="linear")(gm)
    text = caplog.text
    assert "rule linear_relu refused" in text and "rule linear refused: weight is a graph input" in text
    assert "[CHECK_FAILED]" in text  # constant_weight's reason, wrapped with its kind


class _Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, groups=4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.dw(x).mean(dim=(2, 3)))


def _dynamic(per_token: bool) -> QConfig:
    return QConfig(scheme=XNNPACK.dynamic_scheme(per_token=per_token))


@pytest.mark.parametrize("per_token", [False, True])
def test_dynamic_refusals_have_their_kind(per_token):
    """A depthwise conv has no dynamic kernel (``dynamic_check``), a per-token conv no dynamic
    form (``OpRule.dynamic``): both are DYNAMIC_UNSUPPORTED; the linear is quantized."""
    gm = qgraph.capture(_Depthwise().eval(), (torch.randn(1, 4, 6, 6),))
    with pytest.warns(UserWarning, match="stays in float"):
        gm = Annotate(XNNPACK, is_qat=False, config=_dynamic(per_token))(gm).graph_module
    conv = _by_target(gm, aten.conv2d.default)[0]
    (linear,) = _by_target(gm, aten.linear.default)
    refusals = {r.rule: r for r in conv.meta[REFUSALS_KEY]}
    assert refusals["conv"].kind is RefusalKind.DYNAMIC_UNSUPPORTED
    assert ("PerToken" in refusals["conv"].reason) is per_token
    assert ("depthwise" in refusals["conv"].reason) is not per_token
    assert refusals["conv_relu"].kind is RefusalKind.NOT_MATCHED
    assert ANNOTATION_KEY in linear.meta and REFUSALS_KEY not in linear.meta


def test_group_size_misfit_is_a_spec_refusal():
    weight = QuantSpec(dtype=torch.int8, bits=4, symmetric=True, granularity=PerGroup(group_size=3))
    config = QConfig(scheme=QuantScheme(activation=None, weight=weight))
    gm = qgraph.capture(nn.Linear(8, 2), (torch.randn(1, 8),))
    with pytest.warns(UserWarning, match="not a multiple of group size 3"):
        gm = Annotate(XNNPACK, is_qat=False, config=config)(gm).graph_module
    (linear,) = _by_target(gm, aten.linear.default)
    assert linear.meta[REFUSALS_KEY][-1].kind is RefusalKind.SPEC_MISFIT


def test_annotation_only_writes_meta_outputs_unchanged(conv_bn_net, image_batch):
    gm = qgraph.eval_mode(qgraph.capture(conv_bn_net, (image_batch,)))
    before_code, expected = gm.code, gm(image_batch)
    gm = Annotate(XNNPACK, is_qat=False)(gm).graph_module
    gm.recompile()
    assert gm.code == before_code and torch.equal(gm(image_batch), expected)


def test_nothing_matches_in_a_graph_without_quantizable_ops():
    gm = qgraph.capture(nn.Softmax(dim=1), (torch.randn(2, 3),))
    assert not Annotate(XNNPACK, is_qat=False)(gm).modified
