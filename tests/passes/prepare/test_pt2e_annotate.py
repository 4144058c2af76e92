"""pt2e_annotate and apply_pt2e_annotations on their own: what they record, where annotations
land after conv + BN folding, and that neither changes what the graph computes. Shared,
derived and fixed specs, and the comparison with torchao, are in tests/recipes/test_pt2e.py."""

from __future__ import annotations

import torch
from torch import nn

import qgraph
from qgraph.core.meta import ANNOTATION_KEY, PT2E_ANNOTATION_KEY, PT2E_PLAN_KEY, Refusal, RefusalKind
from qgraph.passes.prepare.annotate import REFUSALS_KEY
from qgraph.passes.prepare.apply_pt2e_annotations import ApplyPt2eAnnotations
from qgraph.passes.prepare.fold_conv_bn import FoldConvBn
from qgraph.passes.prepare.fuse_conv_bn_qat import FuseConvBnQat
from qgraph.passes.prepare.pt2e_annotate import Pt2eAnnotate
from qgraph.quant.specs import QuantSpec
from tests.conftest import count_ops, run_pass

aten = torch.ops.aten


def _xnnpack(is_qat: bool):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=is_qat))


class ConvBn(nn.Module):
    """conv → bn (no ReLU): XNNPACK's quantizer puts the output spec on the BN, which QAT
    folding replaces."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_pt2e_annotate_records_a_plan_and_changes_no_op(conv_bn_net, image_batch):
    gm = run_pass(FoldConvBn(), qgraph.capture(conv_bn_net, (image_batch,))).graph_module
    ops = count_ops(gm)
    with torch.no_grad():
        before = gm(image_batch)
    result = run_pass(Pt2eAnnotate(_xnnpack(is_qat=False)), gm)
    gm = result.graph_module
    assert result.modified and count_ops(gm) == ops
    with torch.no_grad():
        assert torch.equal(gm(image_batch), before)
    plan = gm.meta[PT2E_PLAN_KEY]
    assert plan.rule == "pt2e:XNNPACKQuantizer"
    assert not any(PT2E_ANNOTATION_KEY in n.meta or ANNOTATION_KEY in n.meta for n in gm.graph.nodes)
    convs = [n for n in gm.graph.nodes if n.target == aten.conv2d.default]
    first = plan.nodes[convs[0].name]
    assert set(first.input_specs) == {convs[0].args[0].name, convs[0].args[1].name}  # input and weight
    assert first.inputs == [a.name for a in convs[0].all_input_nodes]


def test_apply_moves_the_weight_spec_to_the_qat_folded_weight(conv_bn_net, image_batch):
    gm = qgraph.capture(conv_bn_net.train(), (image_batch,))
    gm = run_pass(Pt2eAnnotate(_xnnpack(is_qat=True)), gm).graph_module
    gm = run_pass(FuseConvBnQat(), gm).graph_module
    ops = count_ops(gm)
    with torch.no_grad():  # eval: no dropout, no update of the running statistics
        before = qgraph.eval_mode(gm)(image_batch)
    result = run_pass(ApplyPt2eAnnotations(), qgraph.train_mode(gm))
    gm = result.graph_module
    assert result.modified and count_ops(gm) == ops and PT2E_PLAN_KEY not in gm.meta
    with torch.no_grad():  # only node.meta changed: the graph computes what it did
        assert torch.equal(qgraph.eval_mode(gm)(image_batch), before)
    qgraph.train_mode(gm)
    convs = [n for n in gm.graph.nodes if n.target == aten.conv2d.default]
    for conv in convs:
        ann, weight = conv.meta[ANNOTATION_KEY], conv.args[1]
        assert weight.target == aten.mul.Tensor  # w * s, which replaced the parameter in slot 1
        assert ann.inputs[weight.name].is_per_channel and ann.inputs[weight.name].narrow_range
        assert set(ann.inputs) <= {n.name for n in conv.all_input_nodes} and ann.output is None
    relus = [n for n in gm.graph.nodes if n.target in (aten.relu.default, aten.relu_.default)]
    assert len(relus) == len(convs) == 2  # conv → BN → ReLU: the quantized output is the ReLU's
    assert all(isinstance(n.meta[ANNOTATION_KEY].output, QuantSpec) for n in relus)


def test_a_folded_away_node_passes_its_output_spec_to_what_replaced_it():
    model, x = ConvBn().train(), torch.randn(2, 3, 8, 8)
    gm = qgraph.capture(model, (x,))
    gm = run_pass(Pt2eAnnotate(_xnnpack(is_qat=True)), gm).graph_module
    bn_name = next(n.name for n in gm.graph.nodes if n.target == aten.batch_norm.default)
    assert gm.meta[PT2E_PLAN_KEY].nodes[bn_name].output is not None  # XNNPACK's conv_bn: output on the BN
    gm = run_pass(FuseConvBnQat(), gm).graph_module
    gm = run_pass(ApplyPt2eAnnotations(), gm).graph_module
    output = next(n for n in gm.graph.nodes if n.op == "output")
    tail = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    assert tail.name != bn_name and isinstance(tail.meta[ANNOTATION_KEY].output, QuantSpec)


def test_layers_the_quantizer_leaves_alone_say_so_for_coverage(conv_bn_net, image_batch):
    class Nothing:
        def annotate(self, gm):
            return gm

        def validate(self, gm):
            pass

    gm = qgraph.capture(conv_bn_net, (image_batch,))
    gm = run_pass(Pt2eAnnotate(Nothing()), gm).graph_module
    result = run_pass(ApplyPt2eAnnotations(), gm)
    assert not result.modified
    layers = [n for n in result.graph_module.graph.nodes if n.target in (aten.conv2d.default, aten.linear.default)]
    expected = [Refusal("pt2e:Nothing", "the PT2E quantizer did not annotate it", RefusalKind.NOT_ANNOTATED)]
    assert layers and all(n.meta[REFUSALS_KEY] == expected for n in layers)
    assert not any(ANNOTATION_KEY in n.meta for n in result.graph_module.graph.nodes)
