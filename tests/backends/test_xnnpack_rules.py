"""Every XNNPACK rule on a model that uses it, converted and run through ExecuTorch."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qgraph
from qgraph.backends.rules.xnnpack import XNNPACK
from qgraph.core.meta import ANNOTATION_KEY
from qgraph.demo import output_scale

aten = torch.ops.aten


class EveryRule(nn.Module):
    """One use of each rule: conv(+relu/+relu6), linear(+relu), add(+relu), mul(+relu), cat,
    hardswish, pooling (max, avg, adaptive), mean, a lone relu, permute / reshape / flatten,
    dropout."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(16, 8, 1)
        self.c1d = nn.Conv1d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16 + 8, 4)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = nn.functional.relu6(self.c2(a))
        c = self.c3(b)
        s = torch.relu(a + c)
        m = torch.relu(s * b)
        cat = torch.cat([m, nn.functional.hardswish(s)], dim=1)
        y = torch.relu(nn.functional.max_pool2d(self.c4(cat), 2))
        y = nn.functional.avg_pool2d(y, 2)
        seq = self.c1d(y.flatten(2))  # N, 8, 4
        pooled = nn.functional.adaptive_avg_pool2d(y, 1).flatten(1)
        t = seq.permute(0, 2, 1).reshape(seq.shape[0], 4, 8).mean(dim=1)
        z = pooled + pooled * t
        h = torch.relu(self.fc1(self.drop(t)))
        return self.fc2(torch.cat([h, z], dim=1))


@pytest.fixture(scope="module")
def converted_every_rule(tmp_path_factory):
    torch.manual_seed(0)
    model = EveryRule().eval()
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no conv or linear may be left in float
        prepared = qgraph.prepare_ptq(model, (x,))
    qgraph.calibrate(prepared, [torch.randn(4, 3, 8, 8) for _ in range(4)], progress=False)
    return model, prepared, qgraph.convert(prepared), x, tmp_path_factory.mktemp("rules")


def test_each_rule_of_the_table_matches_somewhere(converted_every_rule):
    _, prepared, _, _, _ = converted_every_rule
    used = {n.meta[ANNOTATION_KEY].rule for n in prepared.graph.nodes if ANNOTATION_KEY in n.meta}
    # Rules that need a weight-only scheme (the embedding table) are covered in tests/test_llm.py.
    assert used == {r.name for r in XNNPACK.rules if not r.needs_weight_only}


def test_converted_stays_close_to_float_and_runs_in_executorch(converted_every_rule):
    model, _, converted, x, out = converted_every_rule
    with torch.no_grad():
        ref, q = model(x), converted(x)
    # PTQ int8 of a random network: outputs within 10 % of their range of the float model.
    assert (q - ref).abs().max() <= 0.1 * (ref.max() - ref.min())
    report = qgraph.export_pte(converted, (x[:1],), out / "rules.pte")
    assert not [op for op in report.not_delegated if "convolution" in op or "linear" in op]
    got = qgraph.load_pte(report.path)(x[:1])
    assert (got - q[:1]).abs().max() <= 2 * output_scale(converted) * (1 + 1e-3)


class PaddedAfterPermutes(nn.Module):
    """Swin's pattern: a feature map made channels-last and back, then padded (``F.pad``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        y = nn.functional.pad(y.permute(0, 3, 1, 2), (0, 3, 0, 3)).permute(0, 2, 3, 1)
        return self.fc(y)


def test_pad_of_quantized_codes_runs_in_executorch(tmp_path):
    """XNNPACK took this pad (of dequantized codes) and then failed to load the program
    (``xnn_status_invalid_parameter`` creating its ``StaticConstantPad``); the pad now stays
    out of the delegate and the convolution and linear stay in it."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    prepared = qgraph.prepare_ptq(PaddedAfterPermutes().eval(), (x,))
    qgraph.calibrate(prepared, [torch.randn(1, 3, 8, 8) for _ in range(2)], progress=False)
    converted = qgraph.convert(prepared)
    report = qgraph.export_pte(converted, (x,), tmp_path / "pad.pte")
    assert report.not_delegated["aten_constant_pad_nd_default"] == 1, report.not_delegated
    assert not [op for op in report.not_delegated if "convolution" in op or "linear" in op]
    with torch.no_grad():
        want = converted(x)
    # The pad only moves codes and adds zeros; the conv and linear requantize in the delegate
    # as in the converted graph, up to one step of rounding at the output.
    assert (qgraph.load_pte(report.path)(x) - want).abs().max() <= 1 * output_scale(converted) * (1 + 1e-3)
