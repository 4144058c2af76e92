"""The passes that run on a copy just before export: shift_uint8_to_int8 and
fold_bias_dequantize (``.pte``), lower_dynamic_to_integer (``.onnx``).

All three claim to change no output value, so numerics are checked with ``torch.equal``:
the shifted grid is the same set of float values, the folded bias is the very tensor the
dequantize computed, and the fused dynamic ops run the same ops on the same layouts.
"""

from __future__ import annotations

import pytest
import torch

import qgraph
from qgraph.core.graph import copy_graph_module
from qgraph.core.opsets import CHOOSE_QPARAMS_OPS, DYNAMIC_QUANTIZE_OPS
from qgraph.ops.qdq import qd
from qgraph.passes.export.fold_bias_dequantize import FoldBiasDequantize
from qgraph.passes.export.lower_dynamic_to_integer import LowerDynamicToInteger
from qgraph.passes.export.shift_uint8_to_int8 import ShiftUint8ToInt8
from qgraph.recipes.dynamic import quantize_dynamic
from tests.conftest import count_ops, run_pass

QDQ_OPS = {
    qd.quantize_per_tensor.default,
    qd.dequantize_per_tensor.default,
    qd.quantize_per_tensor.tensor,
    qd.dequantize_per_tensor.tensor,
    qd.choose_qparams.tensor,
}


@pytest.fixture(scope="module")
def x86_static():
    from tests.conftest import ConvBnNet, randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(ConvBnNet()).eval()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    p = qgraph.prepare_ptq(model, (x,), backend="x86")
    qgraph.calibrate(p, [x], progress=False)
    return qgraph.convert(p), x


@pytest.fixture(scope="module")
def dynamic_models(x86_static):
    from tests.conftest import ConvBnNet, randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(ConvBnNet()).eval()
    x = x86_static[1]
    return {b: quantize_dynamic(model, (x,), backend=b) for b in ("x86", "xnnpack")}, x


def _apply(pass_, gm):
    return run_pass(pass_, copy_graph_module(gm))


def _dtypes(gm) -> set:
    return {n.args[-1] for n in gm.graph.nodes if n.op == "call_function" and n.target in QDQ_OPS}


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_shift_uint8_to_int8(x86_static, dynamic_models, which):
    gm, x = x86_static if which == "static" else (dynamic_models[0]["x86"], dynamic_models[1])
    assert _dtypes(gm) == {torch.uint8}
    result = _apply(ShiftUint8ToInt8(), gm)
    assert result.modified and _dtypes(result.graph_module) == {torch.int8}
    for node in result.graph_module.graph.nodes:
        if node.target == qd.quantize_per_tensor.default:
            assert node.args[3:5] == (-128, 127) and -128 <= node.args[2] <= 127
    with torch.no_grad():
        assert torch.equal(result.graph_module(x), gm(x))  # the same grid, 128 lower
    assert not _apply(ShiftUint8ToInt8(), result.graph_module).modified
    assert not _apply(ShiftUint8ToInt8(), dynamic_models[0]["xnnpack"]).modified  # already int8


def test_fold_bias_dequantize(x86_static):
    gm, x = x86_static

    def int32_dequantizes(g):
        return [n for n in g.graph.nodes if n.target == qd.dequantize_per_channel.default and n.args[-1] == torch.int32]

    assert len(int32_dequantizes(gm)) == 3  # conv1, conv2, fc
    result = _apply(FoldBiasDequantize(), gm)
    folded = result.graph_module
    assert result.modified and not int32_dequantizes(folded)
    assert not any(b.dtype == torch.int32 for b in folded.buffers())  # the int32 tensors are gone
    assert count_ops(folded)[qd.dequantize_per_channel.default] == 3  # the weights' stay
    with torch.no_grad():
        assert torch.equal(folded(x), gm(x))
    assert not _apply(FoldBiasDequantize(), folded).modified


@pytest.mark.parametrize("backend", ["x86", "xnnpack"])
def test_lower_dynamic_to_integer(dynamic_models, x86_static, backend):
    models, x = dynamic_models
    gm = models[backend]
    result = _apply(LowerDynamicToInteger(), gm)
    lowered = result.graph_module
    ops = count_ops(lowered)
    assert result.modified
    assert ops[torch.ops.qgraph.dynamic_conv.default] == 2 and ops[torch.ops.qgraph.dynamic_linear.default] == 1
    assert not any(ops[o] for o in CHOOSE_QPARAMS_OPS | DYNAMIC_QUANTIZE_OPS | {qd.dequantize_per_channel.default})
    linear = next(n for n in lowered.graph.nodes if n.target == torch.ops.qgraph.dynamic_linear.default)
    assert lowered.get_buffer(linear.args[1].target).shape == (8 * 4 * 4, 5)  # (in, out): MatMulInteger's B
    assert (len(linear.args) == 9) == (backend == "xnnpack")  # the per_token flag
    with torch.no_grad():
        assert torch.equal(lowered(x), gm(x))
        assert torch.equal(lowered(x[:1]), gm(x[:1]))  # qparams still chosen per call
    assert not _apply(LowerDynamicToInteger(), lowered).modified
    assert not _apply(LowerDynamicToInteger(), x86_static[0]).modified  # static layers are not its business


class LayerScale(torch.nn.Module):
    """ConvNeXt's ``layer_scale * x``: a parameter multiplied as an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.layer_scale = torch.nn.Parameter(torch.linspace(0.1, 1.0, 4).reshape(4, 1, 1))

    def forward(self, x):
        return self.layer_scale * self.conv(x)


def test_shift_uint8_to_int8_shifts_quantized_constants():
    """A constant read through a uint8 dequantize gets an int8 copy 128 lower (without it the
    shifted dequantize read uint8 codes as int8: the converted ConvNeXt ran no more)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    p = qgraph.prepare_ptq(LayerScale().eval(), (x,), backend="x86")
    qgraph.calibrate(p, [x], progress=False)
    gm = qgraph.convert(p)
    constants = [n for n in gm.graph.nodes if n.target == qd.dequantize_per_tensor.default and n.args[0].op == "get_attr"]
    assert constants and all(gm.get_buffer(n.args[0].target).dtype == torch.uint8 for n in constants)
    result = _apply(ShiftUint8ToInt8(), gm)
    out = result.graph_module
    read = [n for n in out.graph.nodes if n.target == qd.dequantize_per_tensor.default and n.args[0].op == "get_attr"]
    assert len(read) == len(constants)
    for node in read:
        assert out.get_buffer(node.args[0].target).dtype == torch.int8 and node.args[2] < 0
        assert node.args[0].meta.get("from_node")  # provenance of the new constant
    with torch.no_grad():
        assert torch.equal(out(x), gm(x))
