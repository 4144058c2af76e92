"""InsertQuantizers: one module per group, called at each point; observers are the identity."""

from __future__ import annotations

import torch

import qgraph
from qgraph.backends.rules.xnnpack import XNNPACK
from qgraph.core.meta import GROUPS_KEY, QUANTIZER_KEY
from qgraph.observers.base import FakeQuantize, Observer
from qgraph.passes.prepare.annotate import Annotate
from qgraph.passes.prepare.fold_conv_bn import FoldConvBn
from qgraph.passes.prepare.insert_quantizers import InsertQuantizers
from qgraph.passes.prepare.resolve_specs import ResolveSpecs
from tests.conftest import count_modules


def _resolved(model, x, is_qat):
    gm = qgraph.eval_mode(qgraph.capture(model, (x,)))
    gm = FoldConvBn()(gm).graph_module
    gm = Annotate(XNNPACK, is_qat=is_qat)(gm).graph_module
    gm = ResolveSpecs()(gm).graph_module
    gm.recompile()
    return gm


def test_ptq_observers_are_identity_and_one_module_per_group(conv_bn_net, image_batch):
    gm = _resolved(conv_bn_net, image_batch, is_qat=False)
    expected = gm(image_batch)
    groups = gm.meta[GROUPS_KEY]
    result = InsertQuantizers(is_qat=False)(gm)
    gm = result.graph_module
    gm.graph.lint()
    gm.recompile()
    assert result.modified
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module" and QUANTIZER_KEY in n.meta}
    assert len(modules) == len(groups)
    calls = sum(len(g.outputs) + len(g.edges) for g in groups)
    assert count_modules(gm, Observer) == calls
    # Observers return their input: outputs are bit-identical to the float graph.
    assert torch.equal(gm(image_batch), expected)


def test_qat_fake_quant_is_within_half_a_step_per_quantized_point(conv_bn_net, image_batch):
    gm = InsertQuantizers(is_qat=True)(_resolved(conv_bn_net, image_batch, is_qat=True)).graph_module
    gm.recompile()
    assert count_modules(gm, Observer) == 0 and count_modules(gm, FakeQuantize) > 0
    fq = next(m for m in gm.modules() if isinstance(m, FakeQuantize) and not m.spec.is_per_channel)
    fq.train()
    x = torch.randn(1000)
    y = fq(x)
    scale, _ = fq.qparams()
    # Inside the observed range, fake-quant moves each value by at most half a step.
    assert (y - x).abs().max() <= scale.item() / 2 + 1e-6


def test_edge_quantizer_reads_the_quantized_output_of_its_producer(conv_bn_net, image_batch):
    gm = InsertQuantizers(is_qat=False)(_resolved(conv_bn_net, image_batch, is_qat=False)).graph_module
    for node in gm.graph.nodes:
        if QUANTIZER_KEY in node.meta:
            assert node.meta["from_node"][0].pass_name == "insert_quantizers"
    pool = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.max_pool2d.default)
    assert pool.args[0].op == "call_module"  # max-pool reads the quantized relu output


def test_no_groups_no_change(image_batch):
    gm = qgraph.capture(torch.nn.Softmax(dim=1), (image_batch,))
    gm.meta[GROUPS_KEY] = []
    assert not InsertQuantizers(is_qat=True)(gm).modified
