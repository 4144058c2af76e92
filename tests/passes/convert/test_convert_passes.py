"""The convert passes one by one: fold_bn, remove_dropout, freeze_qparams, quantize_weights."""

from __future__ import annotations

import copy

import pytest
import torch

import qgraph
from qgraph import CalibrationError
from qgraph.core.graph import copy_graph_module as _copy_graph_module
from qgraph.ops.qdq import qd
from qgraph.passes.convert.fold_bn import FoldBn
from qgraph.passes.convert.freeze_qparams import FreezeQparams
from qgraph.passes.convert.quantize_weights import QuantizeWeights
from qgraph.passes.prepare.remove_dropout import RemoveDropout
from tests.conftest import count_modules, count_ops, run_pass

aten = torch.ops.aten


@pytest.fixture
def trained_qat(conv_bn_net, image_batch):
    model = copy.deepcopy(conv_bn_net).train()
    p = qgraph.prepare_qat(model, (image_batch,))
    opt = torch.optim.SGD(p.parameters(), lr=0.01)
    for _ in range(3):
        loss = p(image_batch).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qgraph.eval_mode(p)


def _run(pass_, gm):
    return run_pass(pass_, gm)


def test_fold_bn_leaves_no_bn_and_identical_outputs(trained_qat, image_batch):
    gm = _copy_graph_module(trained_qat)
    expected = gm(image_batch)
    result = _run(FoldBn(), gm)
    assert result.modified
    ops = count_ops(result.graph_module)
    assert ops[aten.batch_norm.default] == 0 and ops[aten.mul.Tensor] == 0 and ops[aten.sqrt.default] == 0
    assert ops[aten.add_.Tensor] == 0  # num_batches_tracked counters of folded BNs are gone
    # The constants are the very values the eval graph computed: bit-identical outputs.
    assert torch.equal(result.graph_module(image_batch), expected)
    assert not _run(FoldBn(), result.graph_module).modified


def test_remove_dropout(trained_qat, image_batch):
    gm = _copy_graph_module(trained_qat)
    expected = gm(image_batch)
    result = _run(RemoveDropout(), gm)
    assert result.modified and count_ops(result.graph_module)[aten.dropout.default] == 0
    assert torch.equal(result.graph_module(image_batch), expected)
    assert not _run(RemoveDropout(), result.graph_module).modified


def test_freeze_qparams_gives_qdq_with_one_dequantize_per_user(trained_qat, image_batch):
    gm = _run(RemoveDropout(), _run(FoldBn(), _copy_graph_module(trained_qat)).graph_module).graph_module
    expected = gm(image_batch)
    result = _run(FreezeQparams(), gm)
    gm = result.graph_module
    ops = count_ops(gm)
    assert result.modified and count_modules(gm, torch.nn.Module) == 1  # only _guards_fn is left
    for q in [n for n in gm.graph.nodes if n.target == qd.quantize_per_tensor.default]:
        assert all(u.target == qd.dequantize_per_tensor.default for u in q.users)
    assert ops[qd.quantize_per_channel.default] == 3  # conv1, conv2, fc weights
    # flatten → (dropout removed) → linear: the repeated quantizer collapsed into one pair
    flatten = next(n for n in gm.graph.nodes if n.target == aten.flatten.using_ints)
    (q,) = flatten.users
    (dq,) = q.users
    assert dq.users and next(iter(dq.users)).target == aten.linear.default
    # Same qparams function as fake-quant: bit-identical outputs.
    assert torch.equal(gm(image_batch), expected)


def test_freeze_qparams_refuses_a_quantizer_that_never_saw_data(conv_bn_net, image_batch):
    p = qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    with pytest.raises(CalibrationError, match="never saw data.*qgraph.calibrate"):
        FreezeQparams()(_copy_graph_module(p))


def test_quantize_weights_stores_int8_and_keeps_outputs(trained_qat, image_batch):
    gm = _copy_graph_module(trained_qat)
    for p in (FoldBn(), RemoveDropout(), FreezeQparams()):
        gm = _run(p, gm).graph_module
    expected = gm(image_batch)
    result = _run(QuantizeWeights(), gm)
    gm = result.graph_module
    assert result.modified and count_ops(gm)[qd.quantize_per_channel.default] == 0
    int8 = [gm.get_buffer(n.args[0].target) for n in gm.graph.nodes if n.target == qd.dequantize_per_channel.default]
    assert len(int8) == 3 and all(t.dtype == torch.int8 for t in int8)
    assert not any(p.dtype == torch.float32 and p.dim() == 4 for p in gm.parameters())  # float conv weights gone
    assert torch.equal(gm(image_batch), expected)
