"""FoldConvBn (PTQ): BN disappears into the conv, outputs unchanged up to float rounding."""

from __future__ import annotations

import pytest
import torch

import qgraph
from qgraph.passes.prepare.fold_conv_bn import FoldConvBn
from tests.conftest import count_ops

aten = torch.ops.aten


@pytest.mark.parametrize("bias", [True, False])
def test_fold_removes_bn_and_keeps_outputs(bias, image_batch):
    from tests.conftest import ConvBnNet, randomize_bn

    model = randomize_bn(ConvBnNet(bias=bias)).eval()
    gm = qgraph.eval_mode(qgraph.capture(model, (image_batch,)))
    before = count_ops(gm)
    result = FoldConvBn()(gm)
    result.graph_module.graph.lint()
    after = count_ops(result.graph_module)
    assert result.modified
    assert before[aten.batch_norm.default] == 2 and after[aten.batch_norm.default] == 0
    assert after[aten.conv2d.default] == 2
    # Float rounding only: w*s and (b-mean)*s+beta reassociate a few float32 ops.
    torch.testing.assert_close(result.graph_module(image_batch), model(image_batch), rtol=1e-5, atol=1e-5)


def test_fold_keeps_provenance_and_is_a_no_op_the_second_time(conv_bn_net, image_batch):
    gm = qgraph.eval_mode(qgraph.capture(conv_bn_net, (image_batch,)))
    gm = FoldConvBn()(gm).graph_module
    conv = next(n for n in gm.graph.nodes if n.target == aten.conv2d.default)
    folded_weight = conv.args[1]
    assert folded_weight.meta["from_node"][0].pass_name == "add_constant"
    assert "conv1" in str(folded_weight.target)
    assert FoldConvBn()(gm).modified is False


def test_a_training_capture_loses_the_bn_counters_too(conv_bn_net, image_batch):
    """``num_batches_tracked += 1`` of a folded BN is gone (a capture in train mode has one per BN)."""
    gm = qgraph.eval_mode(qgraph.capture(conv_bn_net.train(), (image_batch,)))
    assert count_ops(gm)[aten.add_.Tensor] == 2
    gm = FoldConvBn()(gm).graph_module
    gm.graph.lint()
    assert count_ops(gm)[aten.add_.Tensor] == 0


def test_conv_with_two_users_keeps_its_bn(image_batch):
    class TwoUsers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    gm = qgraph.eval_mode(qgraph.capture(TwoUsers().eval(), (image_batch,)))
    result = FoldConvBn()(gm)
    assert not result.modified and count_ops(gm)[aten.batch_norm.default] == 1


def test_conv1d_bn_folds_too():
    from tests.conftest import randomize_bn

    model = randomize_bn(torch.nn.Sequential(torch.nn.Conv1d(4, 6, 3), torch.nn.BatchNorm1d(6), torch.nn.ReLU())).eval()
    x = torch.randn(3, 4, 10)
    gm = qgraph.eval_mode(qgraph.capture(model, (x,)))
    result = FoldConvBn()(gm)
    result.graph_module.recompile()
    assert result.modified and count_ops(result.graph_module)[aten.batch_norm.default] == 0
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-5, atol=1e-5)
