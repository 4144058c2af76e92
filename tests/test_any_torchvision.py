"""Beyond the acceptance list: one model of every other torchvision classification family.

qgraph must work on any torchvision classification model, not only the eleven that
``tests/test_model_zoo.py`` runs through every flow and runtime. This file takes one member
of each remaining family (VGG, DenseNet, Inception, Swin, MaxViT, ...) through the zoo's
own flows and bounds (:func:`tests.test_model_zoo.run_flow`): static PTQ on both backends
(every conv / linear / matmul the backend has a rule for is quantized, every activation
range fits its data, each layer of the runtime's file within one step of the converted
reference fed the runtime's integers: ``.pte`` for XNNPACK, ``.onnx`` for x86) and QAT
for two steps (fake-quant in eval equals the converted model). :func:`test_every_family_is_tested`
fails when torchvision grows a family that neither file covers.

CI runs mnasnet0_5 (PTQ, x86 ``.onnx``); ``-m slow`` runs all of them (about 15 minutes).
"""

from __future__ import annotations

import pytest
import torchvision

from qgraph.tools.coverage import coverage
from tests.test_conformance import RUNTIME
from tests.test_model_zoo import (
    MODELS,
    Flow,
    assert_fake_quant_equals_converted,
    assert_layers_within_one_step,
    assert_ranges_fit,
    run_flow,
)

FAMILIES: dict[str, str] = {
    "alexnet": "alexnet",
    "convnext": "convnext_tiny",
    "densenet": "densenet121",
    "efficientnet_b": "efficientnet_b0",
    "efficientnet_v2": "efficientnet_v2_s",
    "googlenet": "googlenet",
    "inception_v3": "inception_v3",
    "maxvit": "maxvit_t",
    "mnasnet": "mnasnet0_5",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3": "mobilenet_v3_small",
    "regnet_x": "regnet_x_400mf",
    "regnet_y": "regnet_y_400mf",
    "resnet": "resnet18",
    "resnext": "resnext50_32x4d",
    "shufflenet_v2": "shufflenet_v2_x1_0",
    "squeezenet": "squeezenet1_1",
    "swin_": "swin_t",
    "swin_v2": "swin_v2_t",
    "vgg": "vgg11_bn",
    "vit": "vit_b_16",
    "wide_resnet": "wide_resnet50_2",
}
"""Name prefix (the longest that matches wins) → the member that is tested."""

EXTRA: dict[str, tuple[int, dict]] = {
    "alexnet": (64, {}),
    "densenet121": (64, {}),
    "efficientnet_v2_s": (64, {}),
    "googlenet": (64, {"aux_logits": False, "init_weights": True}),
    "inception_v3": (80, {"aux_logits": False, "init_weights": True}),  # 64² pools to nothing
    "maxvit_t": (224, {}),  # its block and grid partitions are sized for 224²
    "mnasnet0_5": (64, {}),
    "regnet_x_400mf": (64, {}),
    "resnext50_32x4d": (64, {}),
    "swin_t": (64, {}),
    "swin_v2_t": (64, {}),
    "vgg11_bn": (64, {}),
    "wide_resnet50_2": (64, {}),
}
"""Families outside the zoo: image size and builder arguments (no auxiliary heads, so a
training-mode forward returns logits alone)."""

FAST = ("mnasnet0_5", "x86", "ptq_static")
"""The case CI runs: depthwise convs, the x86 scheme, ONNX Runtime."""

def _family(name: str) -> str:
    return max((prefix for prefix in FAMILIES if name.startswith(prefix)), key=len, default="")


def test_every_family_is_tested():
    """Every torchvision classification model belongs to a family whose member is tested."""
    names = torchvision.models.list_models(module=torchvision.models)
    assert not [n for n in names if not _family(n)], "a torchvision family no test covers: add it to FAMILIES"
    for member in FAMILIES.values():
        assert member in MODELS or member in EXTRA, f"{member} is neither in the zoo nor in EXTRA"


def _params(pairs):
    for name in EXTRA:
        for backend, mode in pairs:
            marks = () if (name, backend, mode) == FAST else (pytest.mark.slow,)
            yield pytest.param((name, backend, mode), id=f"{name}-{backend}-{mode}", marks=marks)


def _flow(request) -> Flow:
    name, backend, mode = request.param
    size, kwargs = EXTRA[name]
    return run_flow(name, backend, mode, size, **kwargs)


@pytest.fixture(scope="module", params=list(_params([("xnnpack", "ptq_static"), ("x86", "ptq_static")])))
def ptq(request) -> Flow:
    return _flow(request)


@pytest.fixture(scope="module", params=list(_params([("xnnpack", "qat")])))
def qat(request) -> Flow:
    return _flow(request)


def test_every_conv_linear_and_matmul_with_a_rule_is_quantized(ptq):
    """All of them, except a product of two activations under XNNPACK (Swin's and MaxViT's
    attention ``q·kᵀ`` and ``attn·v``): XNNPACK has no static int8 kernel for it, so the
    XNNPACK backend has no rule and keeps it float, as torchao's XNNPACKQuantizer does."""
    report = coverage(ptq.prepared)
    assert report.layers, "no conv / linear / matmul found"
    unexpected = [la for la in report.float_layers() if not (ptq.backend == "xnnpack" and la.op in ("matmul", "bmm"))]
    assert not unexpected, report.to_text()


def test_activation_ranges_fit(ptq, record_property):
    assert_ranges_fit(ptq, record_property)


def test_each_layer_within_one_step_in_the_runtime(ptq, tmp_path_factory, record_property):
    assert_layers_within_one_step(ptq, RUNTIME[ptq.backend], tmp_path_factory, record_property)


def test_qat_fake_quant_equals_converted(qat):
    assert_fake_quant_equals_converted(qat)
