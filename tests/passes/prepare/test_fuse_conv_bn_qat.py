"""FuseConvBnQat: the folded weight is exposed for fake-quant; BN keeps training."""

from __future__ import annotations

import copy

import torch

import qgraph
from qgraph.core.meta import FOLDED_INTO_KEY, SIMULATED_BN_KEY
from qgraph.passes.prepare.fuse_conv_bn_qat import FuseConvBnQat
from qgraph.passes.prepare.simulated_bn import set_simulated_bn_form
from tests.conftest import count_ops, run_pass

aten = torch.ops.aten


def _fused(model, x):
    gm = qgraph.capture(model, (x,))
    return run_pass(FuseConvBnQat(), gm)


def test_structure_of_train_form(conv_bn_net, image_batch):
    result = _fused(conv_bn_net.train(), image_batch)
    gm = result.graph_module
    assert result.modified
    ops = count_ops(gm)
    assert ops[aten.batch_norm.default] == 2 and ops[aten.conv2d.default] == 2
    for conv in [n for n in gm.graph.nodes if n.target == aten.conv2d.default]:
        assert conv.args[1].target == aten.mul.Tensor  # weight is w * s
        assert conv.args[2].target == aten.mul.Tensor  # bias is b * s
        assert SIMULATED_BN_KEY in conv.meta
    tails = [n for n in gm.graph.nodes if FOLDED_INTO_KEY in n.meta]
    assert {n.target for n in tails} == {aten.div.Tensor, aten.reshape.default, aten.batch_norm.default}


def test_train_form_matches_eager_training_and_updates_running_stats(conv_bn_net, image_batch):
    eager = copy.deepcopy(conv_bn_net).train()
    eager.drop.p = 0.0
    model = copy.deepcopy(eager)
    gm = _fused(model, image_batch).graph_module
    # conv(x, w*s)/s == conv(x, w) up to float rounding (one multiply and one divide per element).
    torch.testing.assert_close(gm(image_batch), eager(image_batch), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gm.get_buffer("bn1.running_mean"), eager.bn1.running_mean, rtol=1e-5, atol=1e-6)


def test_eval_form_is_conv_with_folded_bias_and_round_trips(conv_bn_net, image_batch):
    gm = _fused(copy.deepcopy(conv_bn_net).train(), image_batch).graph_module
    qgraph.eval_mode(gm)  # switches the form (set_simulated_bn_form) and turns dropout off
    gm.graph.lint()
    assert count_ops(gm)[aten.batch_norm.default] == 0
    expected = conv_bn_net.eval()
    torch.testing.assert_close(gm(image_batch), expected(image_batch), rtol=1e-4, atol=1e-5)
    assert set_simulated_bn_form(gm, training=True, bn_training=True)
    gm.graph.lint()
    assert count_ops(gm)[aten.batch_norm.default] == 2
    assert not set_simulated_bn_form(gm, training=True, bn_training=True)  # already in train form


def test_nothing_to_fuse_is_not_modified(image_batch):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    assert not _fused(model, image_batch).modified


def test_conv1d_bn_in_both_forms():
    from tests.conftest import randomize_bn

    model = randomize_bn(torch.nn.Sequential(torch.nn.Conv1d(4, 6, 3), torch.nn.BatchNorm1d(6))).train()
    x = torch.randn(3, 4, 10)
    gm = _fused(model, x).graph_module
    eager = copy.deepcopy(model)
    torch.testing.assert_close(gm(x), eager(x), rtol=1e-4, atol=1e-5)  # train form, batch statistics
    qgraph.eval_mode(gm)
    torch.testing.assert_close(gm(x), eager.eval()(x), rtol=1e-4, atol=1e-5)  # eval form, folded bias
