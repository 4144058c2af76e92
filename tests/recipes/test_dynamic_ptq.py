"""Dynamic PTQ: int8 weights ahead of time, activation ranges chosen per batch at run time.

Tolerances. A dynamic layer's output is float, so "one output step" of a static model has
no counterpart; what the runtimes must reproduce is the integers. The ``.pte`` (XNNPACK)
and the ``.onnx`` (``DynamicQuantizeLinear`` + ``MatMulInteger`` / ``ConvInteger``) choose the
same scale and zero point as the converted reference and accumulate the same int32 sums, so
they differ only in the float rescale ``x_scale · w_scale · acc + bias`` — a few ulps
(measured ≤ 5e-7 on outputs of magnitude 0.3–3.5). ``EXACT`` = 1e-4 of the output range is
far below what one input value landing on the neighbouring integer would cause
(``x_scale · |w|``, about 1e-3 of the range here), so passing it means the integers agree.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import pytest
import torch
from torch import nn

import qgraph
from qgraph import ConfigError
from qgraph.observers.base import DynamicQuantizer, Observer
from qgraph.ops.qdq import qd
from qgraph.quant.rules import QuantScheme
from qgraph.quant.specs import Int32Bias, PerChannel, PerToken, QuantSpec
from qgraph.recipes.dynamic import dynamic_config, dynamic_scheme, quantize_dynamic
from tests.conftest import ConvBnNet, count_modules, count_ops, randomize_bn

aten = torch.ops.aten
EXACT = 1e-4
"""Runtime vs converted reference, relative to the output range (see the module docstring)."""
FLOAT_BOUND = 0.05
"""Converted vs float, relative to the output range: 8-bit inputs and weights add about
2/255 ≈ 0.8 % per layer, so a 3-layer net stays under 3 %; a wrong scale or zero point gives
errors of order 100 %. Measured: 0.6 % (CNN), 0.3 % (MLP), 0.2 % (encoder layer)."""


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = randomize_bn(ConvBnNet()).eval()
    return model, torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return Mlp().eval(), torch.randn(8, 20, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True).eval()
    return layer, torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def quantized_cnn(cnn):
    model, x = cnn
    return {backend: quantize_dynamic(model, (x,), backend=backend) for backend in ("xnnpack", "x86")}


# -- structure ----------------------------------------------------------------------------
def test_cnn_structure_per_backend(quantized_cnn):
    xnn, x86 = count_ops(quantized_cnn["xnnpack"]), count_ops(quantized_cnn["x86"])
    # XNNPACK preset: convs per tensor (per image in XNNPACK), the linear per token (per row).
    assert xnn[qd.choose_qparams.tensor] == 2 and xnn[qd.choose_qparams_per_token_asymmetric.default] == 1
    assert xnn[qd.quantize_per_tensor.tensor] == 2 and xnn[qd.dequantize_per_token.default] == 1
    # x86 preset: every input per tensor, uint8, as DynamicQuantizeLinear computes it.
    chooses = [n for n in quantized_cnn["x86"].graph.nodes if n.target == qd.choose_qparams.tensor]
    assert len(chooses) == 3 and all(n.args[1:3] == (0, 255) and n.args[-1] == torch.uint8 for n in chooses)
    for ops in (xnn, x86):
        assert ops[qd.dequantize_per_channel.default] == 3  # int8 weights of both convs and the linear
        assert ops[qd.quantize_per_channel.default] == 0  # folded ahead of time
        assert ops[qd.quantize_per_tensor.default] == 0  # no static activation anywhere
        assert ops[aten.batch_norm.default] == 0
    for q in quantized_cnn.values():
        weights = [n for n in q.graph.nodes if n.target == qd.dequantize_per_channel.default]
        assert all(q.get_buffer(n.args[0].target).dtype == torch.int8 for n in weights)
    x86_weights = [n for n in quantized_cnn["x86"].graph.nodes if n.target == qd.dequantize_per_channel.default]
    assert {n.args[4:6] for n in x86_weights} == {(-63, 63)}  # 7-bit, as the static x86 scheme


def test_no_calibration_needed_and_prepared_ptq_model_is_float(cnn):
    model, x = cnn
    prepared = qgraph.prepare_ptq(model, (x,), backend="x86", config=dynamic_config("x86"))
    assert count_modules(prepared, DynamicQuantizer) == 3 and count_modules(prepared, Observer) == 3  # weights
    with torch.no_grad():
        assert torch.allclose(prepared(x), model(x), atol=1e-6)  # observers and dynamic quantizers pass through
    converted = qgraph.convert(prepared)  # no calibrate(): weights are observed by convert
    assert count_ops(converted)[qd.choose_qparams.tensor] == 3


@pytest.mark.parametrize("backend", ["xnnpack", "x86"])
def test_qat_with_dynamic_activations_equals_converted(cnn, backend):
    model, x = cnn
    p = qgraph.prepare_qat(copy.deepcopy(model).train(), (x,), backend=backend, config=dynamic_config(backend))
    opt = torch.optim.SGD(p.parameters(), lr=0.01)
    for _ in range(2):
        loss = p(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    p.eval()
    # The fake-quant runs the very choose / quantize / dequantize ops convert emits.
    assert torch.equal(p(x), qgraph.convert(p)(x))


# -- numerics vs float --------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["xnnpack", "x86"])
def test_close_to_float(cnn, mlp, quantized_cnn, backend):
    model, x = cnn
    with torch.no_grad():
        assert _relative(quantized_cnn[backend](x), model(x)) < FLOAT_BOUND
        model, x = mlp
        assert _relative(quantize_dynamic(model, (x,), backend=backend)(x), model(x)) < FLOAT_BOUND


def test_ranges_follow_each_batch(mlp):
    model, x = mlp
    q = quantize_dynamic(model, (x,), backend="x86")
    with torch.no_grad():
        # 100× larger inputs than the example: a static range would clip, a dynamic one scales.
        big = 100 * x
        assert _relative(q(big), model(big)) < FLOAT_BOUND


# -- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, wrong",
    [
        ({"bits": 4}, "bits"),
        ({"symmetric": True, "dtype": torch.int8}, "symmetric"),
        ({"granularity": PerChannel(0)}, "granularity"),
        ({"granularity": PerToken(), "dtype": torch.uint8}, "dtype"),
    ],
)
def test_invalid_dynamic_specs_name_the_field(fields, wrong):
    with pytest.raises(ConfigError, match=f"QuantSpec.{wrong}"):
        QuantSpec(**{"dtype": torch.uint8, "dynamic": True, **fields})


def test_dynamic_scheme_refuses_an_int32_bias_and_static_configs(cnn):
    scheme = dynamic_scheme("x86")
    with pytest.raises(ConfigError, match="bias.*run time"):
        QuantScheme(scheme.activation, scheme.weight, Int32Bias())
    model, x = cnn
    with pytest.raises(ConfigError, match="static scheme to the global scheme"):
        quantize_dynamic(model, (x,), config=qgraph.QConfig())


def test_per_token_convs_stay_float_with_a_reason(cnn):
    model, x = cnn
    with pytest.warns(UserWarning, match="no dynamic form with PerToken"):
        q = quantize_dynamic(model, (x,), config=qgraph.QConfig(scheme=dynamic_scheme("xnnpack", per_token=True)))
    ops = count_ops(q)
    assert ops[qd.choose_qparams_per_token_asymmetric.default] == 1 and ops[qd.choose_qparams.tensor] == 0
    assert ops[qd.dequantize_per_channel.default] == 1  # only the linear's weight


def test_mixed_static_and_dynamic(cnn):
    model, x = cnn
    config = qgraph.QConfig().set_module_type(nn.Linear, dynamic_scheme("xnnpack"))
    p = qgraph.prepare_ptq(model, (x,), config=config)
    qgraph.calibrate(p, [x], progress=False)
    ops = count_ops(qgraph.convert(p))
    assert ops[qd.choose_qparams.tensor] == 1  # the linear
    assert ops[qd.quantize_per_tensor.default] >= 2  # the static convs


def test_coverage_counts_dynamic_layers_as_integer(quantized_cnn):
    report = qgraph.coverage(quantized_cnn["xnnpack"])
    assert report.integer_mac_fraction == 1.0


def test_compare_says_it_does_not_handle_dynamic_activations(cnn, quantized_cnn):
    model, x = cnn
    with pytest.raises(ConfigError, match="dynamically quantized activations.*choose_qparams"):
        qgraph.compare(model, quantized_cnn["x86"], [x])


# -- runtimes -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["xnnpack", "x86"])
def test_pte_delegates_every_dynamic_layer_and_matches(cnn, quantized_cnn, backend, tmp_path):
    model, x = cnn
    q = quantized_cnn[backend]
    report = qgraph.export_pte(q, (x[:1],), tmp_path / "m.pte")
    assert report.delegated["aten_convolution_default"] == 2 and report.delegated["aten_linear_default"] == 1
    per_tensor = 2 if backend == "xnnpack" else 3  # xnnpack's linear is per token
    assert report.delegated["quantized_decomposed_choose_qparams_tensor"] == per_tensor
    assert set(report.not_delegated) <= {"getitem"}  # the delegate call's output only
    run = qgraph.load_pte(tmp_path / "m.pte")
    with torch.no_grad():
        for i in range(2):  # batch 1: XNNPACK's per-image conv range is the per-tensor one
            assert _relative(run(x[i : i + 1]), q(x[i : i + 1])) < EXACT


@pytest.mark.parametrize("backend", ["xnnpack", "x86"])
def test_onnx_is_onnx_runtimes_quantize_dynamic_form(cnn, quantized_cnn, backend, tmp_path):
    import onnx
    import onnxruntime as ort

    model, x = cnn
    q = quantized_cnn[backend]
    path = qgraph.export_onnx(q, (x,), tmp_path / "m.onnx")
    ops = Counter(n.op_type for n in onnx.load(path).graph.node)
    assert ops["ConvInteger"] == 2 and ops["MatMulInteger"] == 1
    assert ops["QuantizeLinear"] == 0 and ops["DequantizeLinear"] == 0  # weights stay int8 initializers
    # x86: DynamicQuantizeLinear everywhere; xnnpack's per-token linear quantizes its rows itself.
    assert ops["DynamicQuantizeLinear"] == (3 if backend == "x86" else 2)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    fused = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert fused["DynamicQuantizeMatMul"] == (1 if backend == "x86" else 0)
    with torch.no_grad():
        assert _relative(qgraph.load_onnx(path)(x), q(x)) < EXACT  # every batch size, one range per batch


def test_mlp_in_both_runtimes(mlp, tmp_path):
    model, x = mlp
    q = quantize_dynamic(model, (x,), backend="xnnpack")  # linears per token: XNNPACK's own rows
    report = qgraph.export_pte(q, (x,), tmp_path / "mlp.pte")  # batch 8: one range per row
    assert report.delegated["aten_linear_default"] == 3 and set(report.not_delegated) <= {"getitem"}
    with torch.no_grad():
        assert _relative(qgraph.load_pte(tmp_path / "mlp.pte")(x), q(x)) < EXACT
        q = quantize_dynamic(model, (x,), backend="x86")
        path = qgraph.export_onnx(q, (x,), tmp_path / "mlp.onnx")
        assert _relative(qgraph.load_onnx(path)(x[:3]), q(x[:3])) < EXACT


@pytest.mark.parametrize("backend", ["xnnpack", "x86"])
def test_transformer_encoder_layer_linears_in_onnx(encoder, backend, tmp_path):
    import onnx

    model, x = encoder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_dynamic(model, (x,), backend=backend)
    report = qgraph.coverage(q)
    linear_macs = [layer for layer in report.layers if layer.op == "linear"]
    assert len(linear_macs) == 4 and all(layer.quantized for layer in linear_macs)  # in/out proj, 2 FFN
    with torch.no_grad():
        ref = q(x)
        assert _relative(ref, model(x)) < FLOAT_BOUND
        path = qgraph.export_onnx(q, (x,), tmp_path / "enc.onnx")
        assert Counter(n.op_type for n in onnx.load(path).graph.node)["MatMulInteger"] == 4
        assert _relative(qgraph.load_onnx(path)(x), ref) < EXACT


@pytest.mark.slow
def test_transformer_encoder_layer_pte(encoder, tmp_path):
    model, x = encoder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_dynamic(model, (x[:1],), backend="xnnpack")
    report = qgraph.export_pte(q, (x[:1],), tmp_path / "enc.pte")
    assert report.delegated["aten_linear_default"] == 4
    assert report.delegated["quantized_decomposed_choose_qparams_per_token_asymmetric_default"] == 4
    with torch.no_grad():
        # Per-token ranges are XNNPACK's own (one per row), so the .pte is the reference.
        assert _relative(qgraph.load_pte(tmp_path / "enc.pte")(x[:1]), q(x[:1])) < EXACT


class SqueezeBlock(nn.Module):
    """MobileNetV3's inverted residual: expand 1x1 → depthwise 5x5 → SE → project 1x1."""

    def __init__(self) -> None:
        from torchvision.ops.misc import SqueezeExcitation

        super().__init__()
        self.expand = nn.Conv2d(16, 32, 1)
        self.depthwise = nn.Conv2d(32, 32, 5, stride=2, padding=2, groups=32)
        self.se = SqueezeExcitation(32, 8, scale_activation=nn.Hardsigmoid)
        self.project = nn.Conv2d(32, 24, 1)

    def forward(self, x):
        x = nn.functional.hardswish(self.depthwise(nn.functional.hardswish(self.expand(x))))
        return self.project(self.se(x))


@pytest.mark.parametrize("backend", ["xnnpack", "x86"])
def test_dynamic_depthwise_conv_stays_float_and_the_pte_runs(backend, tmp_path):
    """XNNPACK has no dynamic depthwise conv: quantized, it ran in portable kernels and the
    delegate after it (the SE block) failed to resize at run time (measured on
    mobilenet_v3_small, both backends' ``.pte``). The rules keep it float, with the reason;
    the ``.pte`` runs with every conv delegated."""
    torch.manual_seed(0)
    model, x = SqueezeBlock().eval(), torch.randn(2, 16, 16, 16)
    config = dynamic_config(backend).set_module_name(r"se\..*", None)
    q = quantize_dynamic(model, (x,), backend=backend, config=config)
    layers = {la.module: la for la in qgraph.coverage(q).layers}
    depthwise = layers["depthwise"]
    assert not depthwise.quantized and "depthwise conv" in depthwise.reason
    assert [m for m, la in layers.items() if la.quantized] == ["expand", "project"]
    report = qgraph.export_pte(q, (x[:1],), tmp_path / "block.pte")
    assert not report.not_delegated.get("aten_convolution_default")
    out, want = qgraph.load_pte(report.path)(x[:1]), q(x[:1])
    # Not bit-exact: the float ops before the dynamic project conv (the SE block's mean,
    # hardsigmoid and multiply, depthwise conv) round differently in XNNPACK, and an input
    # that crosses a rounding boundary of the dynamic quantizer moves one step. Both are
    # 8-bit versions of the same values (measured 51 dB apart); a wrong layout or scale gives ~0 dB.
    sqnr = 10 * torch.log10(want.square().sum() / (out - want).square().sum()).item()
    assert sqnr >= 30.0, sqnr


class ShuffleThenConv(nn.Module):
    """ShuffleNetV2's channel shuffle (a 5-d view, transpose, view) feeding a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv2d(16, 16, 1)
        self.post = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = self.pre(x)
        n, c, h, w = x.shape
        return self.post(x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w))


def test_dynamic_conv_after_a_channel_shuffle_stays_float_and_the_pte_runs(tmp_path):
    """Quantized dynamically, the conv after the shuffle made XNNPACK fail to resize at run
    time (shufflenet_v2 ``.pte``); the rule keeps it float and says why."""
    torch.manual_seed(0)
    model, x = ShuffleThenConv().eval(), torch.randn(2, 16, 8, 8)
    q = quantize_dynamic(model, (x,), backend="xnnpack")
    layers = {la.module: la for la in qgraph.coverage(q).layers}
    assert layers["pre"].quantized and not layers["post"].quantized
    assert "channel shuffle" in layers["post"].reason
    out, want = qgraph.load_pte(qgraph.export_pte(q, (x[:1],), tmp_path / "shuffle.pte").path)(x[:1]), q(x[:1])
    # XNNPACK runs a 1x1 conv as a fully-connected layer and picks its input's range per
    # pixel, the graph per tensor: two 8-bit versions of the same values (measured 43 dB
    # apart); a wrong layout or scale gives ~0 dB.
    sqnr = 10 * torch.log10(want.square().sum() / (out - want).square().sum()).item()
    assert sqnr >= 30.0, sqnr
