"""The torchvision classification zoo through every flow, backend and runtime.

For each model of the acceptance list, each backend (xnnpack, x86) and each mode (PTQ
static, PTQ dynamic, QAT for two steps) the model is prepared, calibrated or trained,
converted, written as ``.pte`` and ``.onnx`` through the public API, and each file runs
in its runtime. The exported program is the converted model with every quantized tensor
as an extra output (:mod:`tests.layerwise`; no kernel changes), so one run gives:

* **per layer** (the acceptance bound): each layer of the converted reference, fed the
  runtime's own integers at its inputs, against the runtime's integers at its output —
  within one step of that tensor's grid. One step is the rounding freedom of a
  requantization: the reference computes ``round(acc * s_in * s_w / s_out)`` in float,
  the runtimes with their own fixed-point or fused-float rounding, and an average pool
  lands on exact ties (sum / count) that two float orders round apart.
* **end to end** (what the user sees): the model's output against the reference on the
  same input. Random networks amplify a one-step difference layer after layer (an SE
  block multiplies a whole feature map by a pooled value), so end to end is reported in
  steps and bounded only as a signal-to-noise ratio that catches a wrong layout, scale or
  missing layer.

Models have random weights (no downloads); batch-norm statistics are first settled on
random data so that every layer sees normalized activations, and an all-zero classifier
(ViT's) gets random weights, so that outputs vary. Inputs are 64 × 64 (a vision
transformer is built with ``image_size=64``), which every model in the list accepts and
which keeps each forward cheap; export time depends on the graph, not the resolution.

CI runs a representative few (``FAST``); ``-m slow`` runs the rest. ``ptq_dynamic`` runs
where the backend offers a dynamic scheme.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import qgraph
from qgraph import QConfig
from qgraph.demo import output_scale
from qgraph.models.vision import build_torchvision
from qgraph.models.vision import settle_batch_norm as settle_on_data
from qgraph.tools.coverage import coverage
from tests.layerwise import codes, layer_steps, with_quantized_outputs

RESOLUTION = 64
MODELS: dict[str, dict] = {
    "resnet18": {},
    "resnet50": {},
    "mobilenet_v2": {},
    "mobilenet_v3_small": {},
    "mobilenet_v3_large": {},
    "efficientnet_b0": {},
    "shufflenet_v2_x1_0": {},
    "squeezenet1_1": {},
    "regnet_y_400mf": {},
    "convnext_tiny": {},
    "vit_b_16": {"image_size": RESOLUTION},
}
BACKENDS = ("xnnpack", "x86")
MODES = ("ptq_static", "ptq_dynamic", "qat")
FAST: dict[tuple[str, str, str], frozenset] = {
    ("resnet18", "x86", "qat"): frozenset({"onnx", "pte"}),
    ("mobilenet_v3_small", "xnnpack", "ptq_static"): frozenset({"onnx"}),
}
"""Unmarked cases, and the formats they export in a fast run: both backends, PTQ and QAT,
a plain residual net and one with hardswish and squeeze-excitation (hardsigmoid → mul).
mobilenet_v3_small's whole ``.pte`` (a minute of ExecuTorch lowering) waits for the full
run; ``tests/test_torchvision_zoo.py`` lowers mobilenet_v2 to a ``.pte`` in every run."""

END_TO_END_SQNR_DB = 10.0
"""End-to-end bound: the runtime's output against the reference's, as a signal-to-noise
ratio. See the module docstring for why it is looser than per layer."""

AMPLIFICATION_MARGIN_DB = 3.0
"""How far the bound may drop below the reference's own SQNR against the float model.

A network that amplifies noise amplifies both the reference's rounding (half a step at
every element, against float) and the runtime's one-step differences (at a few elements,
against the reference) through the same layers. Random resnet50 keeps only 9.8 dB of its
float output after 8-bit quantization (every layer above 37 dB on its own); there the
runtimes, within one step at every layer, measure 7.4 dB (.pte) and 8.6 dB (.onnx) against
the reference. So the bound is ``min(10 dB, SQNR(float, reference) − 3 dB)``: runtime noise
at most twice the quantization noise, never below :data:`END_TO_END_FLOOR_DB`."""

END_TO_END_FLOOR_DB = 3.0
"""Whatever the model: a wrong layout, scale or missing layer gives ≤ 0 dB."""


def _cases():
    for name in MODELS:
        for backend in BACKENDS:
            for mode in MODES:
                marks = () if (name, backend, mode) in FAST else (pytest.mark.slow,)
                yield pytest.param((name, backend, mode), id=f"{name}-{backend}-{mode}", marks=marks)


@dataclass
class Flow:
    name: str
    backend: str
    mode: str
    model: nn.Module
    prepared: torch.fx.GraphModule
    converted: torch.fx.GraphModule
    x: torch.Tensor
    calibration: list = field(default_factory=list)
    """The batches a static PTQ model was calibrated on."""
    files: dict = field(default_factory=dict)


def settle_batch_norm(model: nn.Module, generator: torch.Generator, batches: int = 4, size: int = RESOLUTION) -> nn.Module:
    """BN statistics of ``batches`` random batches of 8 images (see :func:`qgraph.models.vision.settle_batch_norm`)."""
    return settle_on_data(model, [torch.randn(8, 3, size, size, generator=generator) for _ in range(batches)])


def dynamic_config(backend: str) -> QConfig:
    """Every conv and linear dynamic, one range per tensor (the same granularity for both)."""
    return QConfig(scheme=qgraph.dynamic_scheme(backend))


def run_flow(name: str, backend: str, mode: str, size: int = RESOLUTION, **builder_kwargs) -> Flow:
    """Build ``name`` (``builder_kwargs`` default to its :data:`MODELS` entry), prepare it for
    ``backend`` and ``mode`` on ``size × size`` images, calibrate or train it, convert it."""
    g = torch.Generator().manual_seed(0)
    model = build_torchvision(name, **(builder_kwargs or MODELS.get(name, {})))
    for module in model.modules():
        # ViT zero-initializes its classifier: its output would be the constant bias.
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02, generator=g)
    for block_name, param in model.named_parameters():
        # ConvNeXt starts its layer_scale at 1e-6: every residual branch would be ~1e-6 and
        # quantize to zeros under the 2^-12 floor of the scale (torchao's XNNPACK eps too).
        if block_name.endswith("layer_scale"):
            with torch.no_grad():
                param.uniform_(0.1, 1.0, generator=g)
    model = settle_batch_norm(model, g, size=size)
    x = torch.randn(4, 3, size, size, generator=g)
    calibration = []
    if mode == "qat":
        prepared = qgraph.prepare_qat(model.train(), (x,), backend=backend)
        opt = torch.optim.SGD(prepared.parameters(), lr=1e-3, momentum=0.9)
        labels = torch.tensor([1, 2, 3, 4])
        for batch in (x, x[:3]):  # the second batch is smaller: the batch dim is dynamic
            loss = nn.functional.cross_entropy(prepared(batch), labels[: len(batch)])
            opt.zero_grad()
            loss.backward()
            opt.step()
        prepared.eval()
        model.eval()
    else:
        config = dynamic_config(backend) if mode == "ptq_dynamic" else None
        prepared = qgraph.prepare_ptq(model, (x,), backend=backend, config=config)
        if mode == "ptq_static":
            calibration = [torch.randn(4, 3, size, size, generator=g) for _ in range(2)]
            qgraph.calibrate(prepared, calibration, progress=False)
    converted = qgraph.convert(prepared)
    x = torch.randn(2, 3, size, size, generator=g)
    return Flow(name, backend, mode, model, prepared, converted, x, calibration)


@pytest.fixture(scope="module", params=list(_cases()))
def flow(request) -> Flow:
    return run_flow(*request.param)


def output_step(flow: Flow, reference: torch.Tensor) -> float:
    """The output grid's step; a dynamic model outputs float, so its range over 255 steps."""
    if flow.mode == "ptq_dynamic":
        return (reference.max() - reference.min()).item() / 255
    return output_scale(flow.converted)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    noise = (reference - test).double().square().sum().item()
    return math.inf if noise == 0 else 10 * math.log10(reference.double().square().sum().item() / noise)


# -- the quantized model ------------------------------------------------------------------


def test_every_conv_and_linear_is_quantized(flow):
    """All of them, but in the dynamic schemes the convs XNNPACK (both backends' ``.pte``)
    cannot run dynamically: depthwise ones, and those fed by a channel shuffle."""
    report = coverage(flow.prepared)
    assert report.layers, "no conv / linear / matmul found"
    floats = [la for la in report.layers if not la.quantized]
    if flow.mode == "ptq_dynamic":
        assert all("depthwise conv" in la.reason or "channel shuffle" in la.reason for la in floats), report.to_text()
    else:
        assert not floats and report.integer_mac_fraction == 1.0, report.to_text()


def _is_squeeze_vector(shape: tuple[int, ...]) -> bool:
    """An SE block's pooled ``N × C × 1 × 1``: one value per channel and sample."""
    return len(shape) > 2 and math.prod(shape[2:]) == 1


def test_every_activation_range_fits_its_data(flow, record_property):
    """Each quantized activation, quantized alone with its qparams, keeps ≥ 20 dB of signal
    (≥ 10 dB for the squeeze vectors of SE blocks).

    The *isolated* SQNR of :func:`qgraph.compare` (the float activation against itself
    quantized with that point's qparams) is the right measure on random weights: the
    output's SQNR against the float model mostly measures how a random network amplifies
    noise (resnet50 or mobilenet_v3 fall to a few dB with every point above 25 dB). An
    8-bit point whose range fits its data sits at 25-50 dB. The exceptions are the squeeze
    vectors of SE blocks (``C × 1 × 1``: one value per channel and sample, eight samples in
    all, most near the activation's floor), bounded at 10 dB. A range from the wrong
    tensor, or a clipped one, falls below 10 dB.

    Measured on the calibration batches, whose min-max the ranges are: on new random
    images a random network's logits and SE vectors leave that range (efficientnet_b0's
    logits: 6.8 dB on held-out images), which says nothing about the ranges qgraph chose.
    """
    if flow.mode != "ptq_static":
        pytest.skip("QAT moved the weights off the float model; a dynamic model has no fixed ranges")
    assert_ranges_fit(flow, record_property)


def assert_ranges_fit(flow: Flow, record_property) -> None:
    """The bounds of :func:`test_every_activation_range_fits_its_data` on a static PTQ flow."""
    report = qgraph.compare(flow.model, flow.converted, flow.calibration)
    with torch.no_grad():
        record_property("output_sqnr_db", round(sqnr_db(flow.model(flow.x), flow.converted(flow.x)), 1))
    small = [r for r in report.rows if _is_squeeze_vector(r.shape)]
    large = [r for r in report.rows if r not in small]
    worst = min(large, key=lambda r: r.isolated_sqnr_db)
    record_property("worst_isolated_sqnr_db", round(worst.isolated_sqnr_db, 1))
    assert worst.isolated_sqnr_db >= 20.0, report.to_text(5)
    assert all(r.isolated_sqnr_db >= 10.0 for r in small), report.to_text(5)


def test_qat_fake_quant_equals_converted(flow):
    if flow.mode != "qat":
        pytest.skip("a PTQ-prepared model observes in float; tracked against float above")
    assert_fake_quant_equals_converted(flow)


def assert_fake_quant_equals_converted(flow: Flow) -> None:
    with torch.no_grad():
        a, b = flow.prepared(flow.x), flow.converted(flow.x)
    step = output_scale(flow.converted)
    # Same qparams, same float ops: identical except where fake_quantize and
    # quantize→dequantize round a tie differently, by one step.
    assert (a == b).float().mean().item() >= 0.99
    assert (a - b).abs().max().item() <= step * (1 + 1e-3)


# -- the files in their runtimes ------------------------------------------------------------


@dataclass
class Run:
    """One exported program run once: the model's outputs and the integers at every cut."""

    graph: torch.fx.GraphModule
    """The converted graph as the emitter sees it (x86 ``.pte``: uint8 shifted to int8)."""
    x: torch.Tensor
    outputs: list
    cuts: dict


def _run(flow: Flow, fmt: str, tmp_path_factory) -> Run:
    """Export ``flow.converted`` (every quantized tensor an extra output) through the public
    API, run it in its runtime once, cache the result on the flow."""
    if fmt in flow.files:
        return flow.files[fmt]
    out = tmp_path_factory.mktemp(f"{flow.name}-{flow.backend}-{flow.mode}")
    if fmt == "pte":
        # The graph ExecuTorch sees, so that the cut integers are on the program's grid.
        graph, x = qgraph.api.export.lower_for_xnnpack(flow.converted), flow.x[:1]  # static shapes
        program, own, names = with_quantized_outputs(graph)
        run = qgraph.load_pte(qgraph.export_pte(program, (x,), out / "model.pte").path)
    else:
        graph, x = flow.converted, flow.x
        program, own, names = with_quantized_outputs(graph)
        run = qgraph.load_onnx(qgraph.export_onnx(program, (x,), out / "model.onnx"))
    values = run(x)
    values = list(values) if isinstance(values, (tuple, list)) else [values]
    flow.files[fmt] = Run(graph, x, values[:own], codes(graph, dict(zip(names, values[own:]))))
    return flow.files[fmt]


@pytest.mark.parametrize("fmt", ["pte", "onnx"])
def test_each_layer_within_one_step_in_the_runtime(flow, fmt, tmp_path_factory, record_property, request):
    """The acceptance bound: every layer, fed the runtime's own inputs, within one step."""
    _skip_in_fast_run(flow, fmt, request)
    if not _run(flow, fmt, tmp_path_factory).cuts:
        pytest.skip("no static activation quantizers: dynamic layers pick their qparams at run time")
    assert_layers_within_one_step(flow, fmt, tmp_path_factory, record_property)


def assert_layers_within_one_step(flow: Flow, fmt: str, tmp_path_factory, record_property) -> None:
    """Export ``flow`` as ``fmt``, run it, and bound each layer fed the runtime's integers."""
    run = _run(flow, fmt, tmp_path_factory)
    assert run.cuts, "no static activation quantizer to compare at"
    steps = layer_steps(run.graph, (run.x,), run.cuts)
    record_property(f"{fmt}_layer_steps", max(steps.values()))
    off = {n: s for n, s in steps.items() if s > 1}
    assert not off, f"{len(off)} of {len(steps)} layers more than one step off: {off}"


@pytest.mark.parametrize("fmt", ["pte", "onnx"])
def test_whole_program_close_to_the_reference(flow, fmt, tmp_path_factory, record_property, request):
    _skip_in_fast_run(flow, fmt, request)
    run = _run(flow, fmt, tmp_path_factory)
    with torch.no_grad():
        ref = flow.converted(run.x)
        quantization_db = sqnr_db(flow.model(run.x), ref)
    got = run.outputs[0]
    assert got.shape == ref.shape and torch.isfinite(got).all()
    steps = (got - ref).abs().max().item() / output_step(flow, ref)
    db = sqnr_db(ref, got)
    bound = max(END_TO_END_FLOOR_DB, min(END_TO_END_SQNR_DB, quantization_db - AMPLIFICATION_MARGIN_DB))
    record_property(f"{fmt}_end_to_end_steps", round(steps, 2))
    record_property(f"{fmt}_end_to_end_sqnr_db", round(db, 1))
    record_property("reference_vs_float_sqnr_db", round(quantization_db, 1))
    assert db >= bound, f"{db:.1f} dB against the reference; the reference keeps {quantization_db:.1f} dB of the float output"


def _skip_in_fast_run(flow: Flow, fmt: str, request) -> None:
    case = (flow.name, flow.backend, flow.mode)
    if fmt not in FAST.get(case, {fmt}) and "not slow" in (request.config.getoption("markexpr") or ""):
        pytest.skip(f"the {fmt} of {case} runs with the slow set (see FAST)")
