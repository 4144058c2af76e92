"""coverage(): quantized layers, reasons for float ones, the integer share of MACs."""

from __future__ import annotations

import pytest
import torch

import qgraph
from qgraph.core.meta import Refusal, RefusalKind
from qgraph.tools.coverage import coverage


def test_all_layers_quantized_and_macs_counted(conv_bn_net, image_batch):
    p = qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    qgraph.calibrate(p, [image_batch], progress=False)
    for model in (p, qgraph.convert(p)):
        report = coverage(model)
        assert [la.op for la in report.layers] == ["conv2d", "conv2d", "linear"]
        # conv1: 8x8x8 outputs x 3*3*3 ; conv2: 8x8x8 x 8*3*3 ; fc: 5 x 128 (per sample)
        assert [la.macs for la in report.layers] == [512 * 27, 512 * 72, 5 * 128]
        assert report.integer_mac_fraction == 1.0 and not report.float_layers()


def test_float_layer_is_listed_with_its_reason(conv_bn_net, image_batch):
    p = qgraph.prepare_ptq(conv_bn_net, (image_batch,), config=qgraph.QConfig().set_module_name("fc", None))
    report = coverage(p)
    (fc,) = report.float_layers()
    assert fc.module == "fc"
    # linear_relu does not match (no relu after fc); linear does, but the config keeps it float.
    # The reason in words is made of the same refusals.
    assert [(r.rule, r.kind) for r in fc.refusals] == [
        ("linear_relu", RefusalKind.NOT_MATCHED),
        ("linear", RefusalKind.CONFIG_FLOAT),
    ]
    assert fc.reason == "; ".join(str(r) for r in fc.refusals)
    assert report.integer_mac_fraction == pytest.approx((512 * 27 + 512 * 72) / (512 * 27 + 512 * 72 + 640))
    assert "integer MACs" in report.to_text()


def test_unquantizable_matmul_reason(image_batch):
    class Attn(torch.nn.Module):
        def forward(self, q, k):
            return q @ k.transpose(1, 2)

    q = torch.randn(2, 4, 8)
    p = qgraph.prepare_ptq(Attn(), (q, q))  # XNNPACK has no matmul rule: it stays float
    report = coverage(p)
    assert len(report.layers) == 1 and not report.layers[0].quantized and report.integer_mac_fraction == 0.0



def test_lora_layers_are_float_with_the_lora_refusal(conv_bn_net, image_batch):
    p = qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    tuned = qgraph.add_lora(p, r=2, targets="fc")
    lora_layers = [la for la in coverage(tuned).layers if not la.quantized]
    assert len(lora_layers) == 2  # the adapter's down and up projections
    for layer in lora_layers:
        (refusal,) = layer.refusals
        assert isinstance(refusal, Refusal) and refusal.kind is RefusalKind.LORA and refusal.rule == "lora"
