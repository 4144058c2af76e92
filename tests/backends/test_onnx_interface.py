"""The interface of exported ONNX files: names, the ``batch`` axis, opset and metadata.

Each model is exported once per module (a few seconds each); the files are read back with
``onnx`` and run in ONNX Runtime at a batch size other than the example's.
"""

from __future__ import annotations

import os

import onnx
import pytest
import torch
from torch import nn

import qgraph
from qgraph.backends.onnx import interface
from qgraph.models.digits import DigitsCNN
from qgraph.recipes.lowbit import int8_dynamic_int4_weight

EXAMPLE_BATCH, OTHER_BATCH = 4, 7


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 64)
        self.down = nn.Linear(64, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(tokens)))


class TwoInTwoOut(nn.Module):
    """Two inputs; returns one value twice (the exporter gives both outputs one value)."""

    def forward(self, image: torch.Tensor, mask: torch.Tensor):
        y = image.flatten(1) * mask
        return y, y


def _digits() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return DigitsCNN().eval(), torch.randn(EXAMPLE_BATCH, 1, 8, 8)


def _static():
    model, x = _digits()
    prepared = qgraph.prepare_ptq(model, (x,))
    qgraph.calibrate(prepared, [x, -x], progress=False)
    return qgraph.convert(prepared), x


def _dynamic():
    model, x = _digits()
    return qgraph.quantize_dynamic(model, (x,), backend="x86"), x


def _8da4w():
    torch.manual_seed(0)
    x = torch.randn(EXAMPLE_BATCH, 5, 64)
    config = qgraph.QConfig(scheme=int8_dynamic_int4_weight(group_size=32))
    return qgraph.convert(qgraph.prepare_ptq(TwoLinears().eval(), (x,), config=config)), x


STATIC = "weights int8[-127,127] per-channel x3; activations int8[-128,127] per-tensor x6"
DYNAMIC = "weights int7[-63,63] per-channel x3; activations uint8[0,255] per-tensor dynamic x3"
LOW_BIT = "weights int4[-8,7] per-group(32) x2; activations int8[-128,127] per-token dynamic x2"
# name: (build, input name, backend, scheme summary, opset)
FLOWS = {
    "static": (_static, "x", "xnnpack", STATIC, 20),
    "dynamic": (_dynamic, "x", "x86", DYNAMIC, 20),
    "8da4w": (_8da4w, "tokens", "xnnpack", LOW_BIT, 21),
}


@pytest.fixture(scope="module", params=sorted(FLOWS))
def exported(request, tmp_path_factory):
    build, *expected = FLOWS[request.param]
    quantized, x = build()
    path = qgraph.export_onnx(quantized, (x,), tmp_path_factory.mktemp(request.param) / "model.onnx")
    return quantized, x, path, expected


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_names_axis_and_metadata(exported):
    quantized, x, path, (input_name, backend, scheme, opset) = exported
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == [input_name]
    assert [o.name for o in model.graph.output] == ["output"]
    assert _dims(model.graph.input[0]) == ["batch", *x.shape[1:]]
    assert _dims(model.graph.output[0])[0] == "batch"
    # no torch.export symbol (s77) is left anywhere in the file's shapes
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    assert {d.dim_param for v in values for d in v.type.tensor_type.shape.dim if d.dim_param} == {"batch"}
    props = {p.key: p.value for p in model.metadata_props}
    assert set(props) == set(interface.METADATA_KEYS)
    assert props["qgraph.version"] == qgraph.__version__ == model.producer_version
    assert model.producer_name == "qgraph"
    assert props["qgraph.backend"] == backend
    assert props["qgraph.scheme"] == scheme
    assert props["qgraph.opset"] == str(opset)
    assert {o.domain: o.version for o in model.opset_import}[""] == opset


def test_runs_at_another_batch_size(exported):
    """ONNX Runtime (graph optimizations off: the plain Q/DQ graph) at batch 7 against the
    converted graph at batch 7.

    Tolerances: the static model's output is quantized, so within one step of its grid (float
    rounding may move a value across a rounding boundary). The dynamic models' outputs are
    float: within 1e-4 of the output's range (float32 sums in another order), except that
    per-token ranges are chosen in float64 by torch and in float32 by the ONNX graph, so a
    token whose input sits at a rounding boundary gets one code apart and its whole output
    row moves: at most a tenth of the rows, each within 2 % of the output's range.
    """
    quantized, x, path, _ = exported
    torch.manual_seed(1)
    x7 = torch.randn(OTHER_BATCH, *x.shape[1:])
    got = qgraph.load_onnx(path, optimize=False)(x7)
    with torch.no_grad():
        want = quantized(x7)
    assert got.shape == want.shape == (OTHER_BATCH, *want.shape[1:])
    step = _output_step(quantized)
    if step is not None:
        assert (got - want).abs().max().item() <= step * 1.001
        return
    span = float(want.abs().max())
    rows = (got - want).abs().reshape(-1, want.shape[-1]).amax(dim=1)
    moved = rows > 1e-4 * span
    assert moved.float().mean().item() <= 0.1 and rows.max().item() <= 0.02 * span


def _output_step(quantized: torch.fx.GraphModule) -> float | None:
    """The scale of a statically quantized output, None for a float one."""
    out = next(n for n in quantized.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    if out.target == torch.ops.quantized_decomposed.dequantize_per_tensor.default:
        return float(out.args[1])
    return None


@pytest.fixture(scope="module")
def static_model():
    return _static()


def test_chosen_names_and_opset(static_model, tmp_path):
    quantized, x = static_model
    default = onnx.load(qgraph.export_onnx(quantized, (x,), tmp_path / "default.onnx"))
    internal = default.graph.node[0].output[0]  # an internal value's name, taken by an output below
    path = qgraph.export_onnx(
        quantized, (x,), tmp_path / "named.onnx", input_names=["image"], output_names=[internal], opset=19
    )
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == [internal]
    produced = [o for node in model.graph.node for o in node.output]
    assert produced.count(internal) == 1  # the internal value was renamed, not duplicated
    assert {o.domain: o.version for o in model.opset_import}[""] == 19
    assert {p.key: p.value for p in model.metadata_props}["qgraph.opset"] == "19"
    got = qgraph.load_onnx(path, optimize=False)(x)
    with torch.no_grad():
        assert (got - quantized(x)).abs().max().item() <= _output_step(quantized) * 1.001


def test_several_inputs_and_outputs_of_a_float_model(tmp_path):
    """A float nn.Module: names from ``forward``'s signature, ``output_0`` / ``output_1`` for
    two outputs that the exporter gave one value (each gets its own), backend ``none``."""
    image, mask = torch.randn(3, 1, 4, 4), torch.rand(3, 16)
    path = qgraph.export_onnx(TwoInTwoOut().eval(), (image, mask), tmp_path / "two.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image", "mask"]
    assert [o.name for o in model.graph.output] == ["output_0", "output_1"]
    assert _dims(model.graph.input[1])[0] == "batch"
    props = {p.key: p.value for p in model.metadata_props}
    assert props["qgraph.backend"] == "none" and props["qgraph.scheme"] == "float"
    a, b = qgraph.load_onnx(path)(image[:2], mask[:2])
    assert torch.equal(a, b) and torch.equal(a, image[:2].flatten(1) * mask[:2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_names": "x"}, "must be a list of strings"),
        ({"input_names": ["a", "b"]}, "gives 2 name(s) but the model has 1"),
        ({"output_names": ["y", "y"]}, "repeats ['y']"),
        ({"output_names": [""]}, "is not a name"),
        ({"input_names": ["y"], "output_names": ["y"]}, "named both an input and an output"),
        ({"opset": 17}, "choose an integer opset from 18"),
        ({"opset": 10_000}, "choose an integer opset from 18"),
    ],
)
def test_bad_arguments_name_the_argument_and_write_nothing(static_model, tmp_path, kwargs, message):
    quantized, x = static_model
    path = tmp_path / "model.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(qgraph.ConfigError) as info:
        qgraph.export_onnx(quantized, (x,), path, **kwargs)
    assert message in str(info.value)
    assert path.read_bytes() == b"keep me" and os.listdir(tmp_path) == ["model.onnx"]


def test_group_weights_refuse_an_opset_before_21(tmp_path):
    quantized, x = _8da4w()
    with pytest.raises(qgraph.ConfigError, match="first in opset 21"):
        qgraph.export_onnx(quantized, (x,), tmp_path / "m.onnx", opset=20)
    assert not (tmp_path / "m.onnx").exists()


def test_axis_names_of_a_second_dynamic_axis():
    """Any symbol not on axis 0 is ``dim_<axis>``; two different batch symbols stay apart."""
    import onnx_ir as ir

    inputs = [
        ir.Value(name="a", shape=ir.Shape([ir.SymbolicDim("s77"), ir.SymbolicDim("s3"), 8])),
        ir.Value(name="b", shape=ir.Shape([ir.SymbolicDim("s52"), ir.SymbolicDim("s3")])),
    ]
    model = ir.Model(ir.Graph(inputs, [], nodes=[]), ir_version=10)
    assert interface.axis_names(model) == {"s77": "batch", "s3": "dim_1", "s52": "batch_1"}
