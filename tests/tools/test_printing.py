"""What the tools print: reports as short tables, progress bars that name their task and are
gone (``leave=False``) before a table is printed."""

from __future__ import annotations

import pytest
import torch

import qgraph
from qgraph.backends.rules.xnnpack import xnnpack_scheme
from qgraph.tools.check import check
from qgraph.tools.compare import compare
from qgraph.tools.coverage import coverage
from qgraph.tools.sensitivity import auto_mixed_precision, sensitivity

W4A4 = xnnpack_scheme(is_qat=False, weight_bits=4, act_bits=4)


@pytest.fixture
def converted(conv_bn_net, image_batch):
    prepared = qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    qgraph.calibrate(prepared, [image_batch], progress=False)
    return prepared, qgraph.convert(prepared)


def test_coverage_prints_its_table(converted):
    _, q = converted
    text = str(coverage(q))
    assert text == coverage(q).to_text()
    assert text.splitlines()[0].split()[:3] == ["node", "module", "op"]
    assert "LayerCoverage(" not in text and text.endswith("integer MACs: 100.0 %")


def _bars(err: str) -> list[str]:
    """The descriptions tqdm drew on stderr (each redraw starts with a carriage return), after
    checking that the last bar was wiped (``leave=False``: a blank redraw, then ``\\r``)."""
    assert err.endswith("\r") and err.split("\r")[-2].strip() == "", repr(err[-200:])
    return sorted({part.split(":")[0].strip() for part in err.split("\r") if "%|" in part})


def test_sensitivity_and_search_show_named_bars_then_print_tables(conv_bn_net, image_batch, capsys):
    fp32 = conv_bn_net(image_batch).detach()

    def eval_fn(model) -> float:  # higher is better: minus the error against the float model
        with torch.no_grad():
            return -float((model(image_batch) - fp32).pow(2).mean())

    report = sensitivity(conv_bn_net, (image_batch,), eval_fn, scheme=W4A4, progress=True)
    assert _bars(capsys.readouterr().err) == ["sensitivity"]
    assert str(report) == report.to_text() and report.to_text().splitlines()[1].split()[0] == "layer"
    result = auto_mixed_precision(conv_bn_net, (image_batch,), eval_fn, scheme=W4A4, tolerable_loss=0.0, report=report,
                                  progress=True)  # fmt: skip
    assert _bars(capsys.readouterr().err) == ["mixed precision search"]
    assert str(result) == result.report and "MixedPrecisionResult(" not in str(result)
    sensitivity(conv_bn_net, (image_batch,), eval_fn, scheme=W4A4, progress=False)
    assert capsys.readouterr().err == ""


def test_compare_and_check_show_named_bars(conv_bn_net, image_batch, converted, capsys):
    prepared, q = converted
    compare(conv_bn_net, q, [image_batch, image_batch * 0.5], progress=True)
    assert _bars(capsys.readouterr().err) == ["compare"]
    check(prepared, q, (image_batch,), targets=("fake_quant", "reference"), progress=True)
    captured = capsys.readouterr()
    assert _bars(captured.err) == ["check"]
    assert captured.out.startswith("largest difference per quantized tensor")  # the table, on stdout
    check(prepared, q, (image_batch,), targets=("reference",), progress=False, verbose=False)
    assert capsys.readouterr().err == ""
