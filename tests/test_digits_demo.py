"""Acceptance on the digits CNN: the demo's own run, end to end through both runtimes.

Tolerances: QAT may lose at most 0.5 accuracy points against fp32 (the issue's bar).
Eval-mode fake-quant and the converted graph use the same qparams code and the same
folded constants, so ≥ 99 % of outputs must be identical and none more than one output
quantization step apart. The runtimes compute the same int8 math with their own
rounding of intermediate requantizations; one output step is the bound.
"""

from __future__ import annotations

import pytest

from qgraph.demo import LOW_BITS, run_demo

STEP_SLACK = 1e-3  # the step ratio is computed in float32: 1.0 can read as 1.0000002


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # one low-bit row keeps the run short; tests/test_low_bit.py covers all three against torchao
    return run_demo(tmp_path_factory.mktemp("demo"), progress=False, low_bits=((4, 4),))


def test_qat_int8_keeps_fp32_accuracy(demo):
    acc = demo.accuracy
    assert acc["QAT int8 converted"] >= acc["fp32"] - 0.5
    assert acc["PTQ int8 (converted)"] >= acc["fp32"] - 2.0


def test_fake_quant_equals_converted(demo):
    assert demo.identical_fraction >= 0.99
    assert demo.steps_from_converted["QAT fake-quant (eval)"] <= 1 + STEP_SLACK


@pytest.mark.parametrize("runtime", [".pte", ".onnx"])
def test_runtimes_within_one_output_step(demo, runtime):
    assert demo.steps_from_converted[runtime] <= 1 + STEP_SLACK
    key = ".pte (ExecuTorch, XNNPACK)" if runtime == ".pte" else ".onnx (ONNX Runtime)"
    assert demo.accuracy[key] >= demo.accuracy["QAT int8 converted"] - 0.5


def test_low_bit_rows(demo):
    acc = demo.accuracy
    assert LOW_BITS == ((4, 8), (4, 4), (3, 4))  # what `make demo` shows
    assert "PTQ W4A4 (converted)" in acc
    assert acc["QAT W4A4 (converted)"] >= acc["fp32"] - 1.0  # the bar for low-bit QAT


def test_files_sizes_and_table(demo):
    assert demo.sizes["digits_int8.pte"] < demo.sizes["digits_fp32.pte"] / 2
    table = demo.table()
    for row in ("fp32", "PTQ int8", "QAT int8 fake-quant", "QAT int8 converted", ".pte", ".onnx", "latency"):
        assert row in table
