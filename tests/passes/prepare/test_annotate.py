"""Annotate: backend rules write specs; refusals are explained; strict mode errors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import qgraph
from qgraph import QConfig, UnsupportedOperatorError
from qgraph.backends.rules.xnnpack import XNNPACK
from qgraph.core.meta import ANNOTATION_KEY
from qgraph.passes.prepare.annotate import Annotate
from qgraph.passes.prepare.fuse_conv_bn_qat import FuseConvBnQat
from qgraph.quant.specs import QuantSpec, SharedSpec

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


def test_annotation_only_writes_meta_outputs_unchanged(conv_bn_net, image_batch):
    gm = qgraph.eval_mode(qgraph.capture(conv_bn_net, (image_batch,)))
    before_code, expected = gm.code, gm(image_batch)
    gm = Annotate(XNNPACK, is_qat=False)(gm).graph_module
    gm.recompile()
    assert gm.code == before_code and torch.equal(gm(image_batch), expected)


def test_nothing_matches_in_a_graph_without_quantizable_ops():
    gm = qgraph.capture(nn.Softmax(dim=1), (torch.randn(2, 3),))
    assert not Annotate(XNNPACK, is_qat=False)(gm).modified
