"""PT2E quantizers through qgraph's passes, and ExportedProgram inputs to prepare_*.

The oracle is torchao's own flow (``prepare_qat_pt2e`` / ``convert_pt2e``) with ExecuTorch's
``XNNPACKQuantizer`` on torchvision resnet18 (random weights, 2×3×64×64). A *site* is one
quantizer (observer / fake-quant) or quantize / dequantize op, keyed by the op that produces
its input, the ops that read it and its range and granularity: the same multiset of sites
means the same quantization points with the same specs.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn

import qgraph
from qgraph import ConfigError
from qgraph.core.graph import copy_graph_module
from qgraph.core.meta import ANNOTATION_KEY
from qgraph.core.opsets import DEQUANTIZE_OPS, QUANTIZE_OPS
from qgraph.demo import output_scale
from qgraph.models.vision import build_torchvision
from qgraph.observers.base import QUANTIZER_TYPES
from qgraph.passes.prepare.pt2e_annotate import is_pt2e_quantizer
from qgraph.quant.specs import DerivedSpec, SharedSpec
from tests.conftest import ConvBnNet, count_ops

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _xnnpack(is_qat: bool = True, **kwargs):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=is_qat, **kwargs))


def _target(node: torch.fx.Node) -> str:
    return str(node.target) if node.op == "call_function" else node.op


def _range_of(module: nn.Module) -> tuple:
    """(quant_min, quant_max, per_channel) of a qgraph or a torchao quantizer module."""
    spec = getattr(module, "spec", None)
    if spec is not None:
        return spec.quant_min, spec.quant_max, spec.is_per_channel
    return module.quant_min, module.quant_max, module.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)


def prepared_sites(gm: torch.fx.GraphModule) -> Counter:
    """Quantizer call sites of a prepared graph (qgraph's modules or torchao's
    ``activation_post_process_*``), with the range each quantizes to."""
    sites: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, QUANTIZER_TYPES) or node.target.startswith("activation_post_process"):
            users = tuple(sorted(_target(u) for u in node.users))
            sites[(_target(node.args[0]), users, *_range_of(module))] += 1
    return sites


def converted_sites(gm: torch.fx.GraphModule) -> Counter:
    """Quantize / dequantize ops of a converted graph: (op, producer op, consumer ops)."""
    sites: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in QUANTIZE_OPS | DEQUANTIZE_OPS:
            users = tuple(sorted(_target(u) for u in node.users))
            sites[(str(node.target), _target(node.args[0]), users)] += 1
    return sites


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return build_torchvision("resnet18").train()


@pytest.fixture(scope="module")
def pt2e_prepared(resnet18) -> torch.fx.GraphModule:
    return qgraph.prepare_qat(resnet18, (X,), backend=_xnnpack())


def test_a_quantizer_is_recognised_by_annotate_and_validate():
    assert is_pt2e_quantizer(_xnnpack())
    assert not is_pt2e_quantizer("xnnpack") and not is_pt2e_quantizer(object())


def test_xnnpack_quantizer_qat_puts_quantizers_where_torchao_does(resnet18, pt2e_prepared):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    oracle = prepare_qat_pt2e(torch.export.export(copy.deepcopy(resnet18), (X,)).module(), _xnnpack())
    ours, theirs = prepared_sites(pt2e_prepared), prepared_sites(oracle)
    assert sum(ours.values()) == 54  # 21 conv/linear inputs, 21 weights, 12 outputs (relu, add, pool)
    assert ours == theirs
    assert all(a.rule == "pt2e:XNNPACKQuantizer" for n in pt2e_prepared.graph.nodes if (a := n.meta.get(ANNOTATION_KEY)))


def test_xnnpack_quantizer_qat_is_qgraph_xnnpack_backend_bit_for_bit(resnet18, pt2e_prepared):
    """ExecuTorch's QAT config (int8 affine activations, int8 [-127, 127] per-channel
    weights, moving-average ranges) is the scheme of qgraph's own "xnnpack" backend; after one
    training step (both ranges start at the first batch) the fake-quant outputs are equal."""
    native = qgraph.prepare_qat(resnet18, (X,), backend="xnnpack")
    adapted = copy_graph_module(pt2e_prepared)  # the fixture stays untrained for the other tests
    assert prepared_sites(adapted) == prepared_sites(native)
    with torch.no_grad():
        for model in (adapted, native):
            qgraph.train_mode(model)(X)
            qgraph.eval_mode(model)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        assert torch.equal(adapted(x), native(x))


@pytest.mark.slow  # torchao's convert_pt2e alone takes 35-70 s on 2 cores (fixed cost, FACTS.md)
def test_xnnpack_quantizer_qat_converts_to_torchaos_qdq_and_numbers(resnet18, pt2e_prepared):
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
    from torchao.quantization.pt2e.fake_quantize import disable_observer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    oracle = prepare_qat_pt2e(torch.export.export(copy.deepcopy(resnet18), (X,)).module(), _xnnpack())
    ours = copy_graph_module(pt2e_prepared)
    with torch.no_grad():
        qgraph.train_mode(ours)(X)
        move_exported_model_to_train(oracle)(X)
    oracle.apply(disable_observer)
    converted, oracle_converted = qgraph.convert(qgraph.eval_mode(ours)), convert_pt2e(move_exported_model_to_eval(oracle))
    assert converted_sites(converted) == converted_sites(oracle_converted)
    q = torch.ops.quantized_decomposed
    for op in (q.quantize_per_tensor.default, q.dequantize_per_tensor.default, q.dequantize_per_channel.default):
        assert count_ops(converted)[op] == count_ops(oracle_converted)[op] > 0
    # Numbers: in training, torchao's fused fake-quant applies per-channel [-127, 127] weights
    # with scale max|w| / 127.5 (measured: its outputs are multiples of 255/256 of the scale
    # it converts with, max|w| / 127), so the training step's BN statistics and activation
    # ranges differ slightly from qgraph's and the difference grows over 20 layers: measured
    # 7.2 output steps at most (10 % of outputs identical). Doubling the weight scale of one
    # conv moves the outputs by 34-56 steps (measured on three of them).
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (converted(x) - oracle_converted(x)).abs().max().item()
    assert diff <= 10 * output_scale(converted)


class _OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return torch.sigmoid(self.fc(x))


class _LinearQuantizer:
    """A hand-written PT2E quantizer (no torchao base class: only the duck-typed API): int8
    input and weight of every linear, and ``bias`` / ``output`` specs supplied by the test."""

    def __init__(self, bias=None, output=None, weight_range=(-127, 127)):
        self.bias, self.output, self.weight_range = bias, output, weight_range

    def annotate(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec

        act = QuantizationSpec(torch.int8, MinMaxObserver.with_args(eps=2**-12), -128, 127, torch.per_tensor_affine)
        weight = QuantizationSpec(torch.int8, PerChannelMinMaxObserver, *self.weight_range, torch.per_channel_symmetric, 0)
        for node in gm.graph.nodes:
            if node.target == torch.ops.aten.linear.default:
                x, w, b = node.args
                specs = {x: act, w: weight}
                if self.bias is not None:
                    specs[b] = self.bias(x, w, node)
                output = self.output(node) if self.output is not None else None
                node.meta["quantization_annotation"] = QuantizationAnnotation(specs, output, _annotated=True)
        return gm

    def validate(self, gm: torch.fx.GraphModule) -> None:
        pass


def _product_of_scales(observers):
    (sa, _), (sw, _) = (o.calculate_qparams() for o in observers)
    return sa * sw, torch.zeros_like(sw, dtype=torch.int32)


def _derived_bias(fn):
    def make(x, w, node):
        from torchao.quantization.pt2e.quantizer import DerivedQuantizationSpec

        return DerivedQuantizationSpec([(x, node), (w, node)], fn, torch.int32, qscheme=torch.per_channel_symmetric, ch_axis=0)

    return make


def test_a_hand_written_quantizer_gives_its_specs_shared_and_derived():
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    quantizer = _LinearQuantizer(bias=_derived_bias(_product_of_scales), output=lambda n: SharedQuantizationSpec((n.args[0], n)))
    model, x = _OneLinear().eval(), torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    prepared = qgraph.prepare_ptq(model, (x,), backend=quantizer)
    linear = next(n for n in prepared.graph.nodes if n.target == torch.ops.aten.linear.default)
    ann = linear.meta[ANNOTATION_KEY]
    x_name, w_name, b_name = (a.args[0].name for a in linear.args)  # each read through its observer
    assert ann.rule == "pt2e:_LinearQuantizer"
    assert ann.inputs[b_name] == DerivedSpec(points=((x_name, "linear"), (w_name, "linear")), dtype=torch.int32)
    assert ann.output == SharedSpec((x_name, "linear"))
    weight = ann.inputs[w_name]
    assert (weight.quant_min, weight.quant_max, weight.symmetric, weight.narrow_range) == (-127, 127, True, True)
    assert (weight.observer, weight.is_per_channel, ann.inputs[x_name].observer) == ("minmax", True, "minmax")
    qgraph.calibrate(prepared, [x], progress=False)
    converted = qgraph.convert(prepared)
    assert count_ops(converted)[torch.ops.quantized_decomposed.dequantize_per_channel.default] == 2  # weight, bias
    # The output shares the input's int8 grid (step = range of x / 255 ≈ 0.03) and clamps
    # to it; x, w and the output each round once: within 3 steps of the float model where
    # the linear's output stays inside the input's range, and the sigmoid (slope ≤ 1/4)
    # shrinks that. A wrong bias scale gives errors of order 1.
    step = (x.max() - x.min()).item() / 255
    with torch.no_grad():
        ref, out = torch.sigmoid(model.fc(x).clamp(x.min(), x.max())), converted(x)
    assert (ref - out).abs().max().item() <= 3 * step / 4


def test_fixed_qparams_translate_and_the_pipeline_says_it_cannot_place_them_yet():
    from torchao.quantization.pt2e.quantizer import FixedQParamsQuantizationSpec

    fixed = FixedQParamsQuantizationSpec(torch.int8, 1 / 256, -128, -128, 127, torch.per_tensor_affine)
    with pytest.raises(ConfigError, match="FixedSpec on linear is not supported by this pipeline yet"):
        qgraph.prepare_ptq(_OneLinear().eval(), (torch.randn(4, 8),), backend=_LinearQuantizer(output=lambda n: fixed))


@pytest.mark.parametrize(
    ("quantizer", "message"),
    [
        (_LinearQuantizer(bias=_derived_bias(lambda obs: (torch.tensor([1.0]), torch.tensor([0])))), "not scale = product of scales"),
        (_LinearQuantizer(weight_range=(-100, 100)), "range [-100, 100] of torch.int8 is not one qgraph expresses"),
    ],
)
def test_a_spec_qgraph_cannot_compute_is_refused_naming_the_node(quantizer, message):
    with pytest.raises(ConfigError, match="'linear'") as exc:
        qgraph.prepare_ptq(_OneLinear().eval(), (torch.randn(4, 8),), backend=quantizer)
    assert message in str(exc.value)


def test_a_quantizer_and_a_config_together_are_refused():
    with pytest.raises(ConfigError, match="PT2E quantizer carries its own configuration"):
        qgraph.prepare_ptq(_OneLinear().eval(), (torch.randn(4, 8),), backend=_LinearQuantizer(), config=qgraph.QConfig())


def test_prepare_takes_an_exported_program_and_leaves_it_untouched():
    model = ConvBnNet().eval()
    x = torch.randn(4, 3, 8, 8)
    program = torch.export.export(copy.deepcopy(model), (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    code, state = program.graph_module.code, {k: v.clone() for k, v in program.state_dict.items()}
    from_program = qgraph.prepare_ptq(program, (x,))
    from_module = qgraph.prepare_ptq(model, (x,))
    assert count_ops(from_program) == count_ops(from_module)
    for prepared in (from_program, from_module):
        qgraph.calibrate(prepared, [x], progress=False)
    with torch.no_grad():
        assert torch.equal(qgraph.convert(from_program)(x), qgraph.convert(from_module)(x))
    qat = qgraph.prepare_qat(program, (x,))  # QAT prepares a program for training
    assert qat.training
    opt = torch.optim.SGD(qat.parameters(), lr=0.5)
    qat(x).square().mean().backward()
    opt.step()
    assert program.graph_module.code == code
    assert all(torch.equal(program.state_dict[k], v) for k, v in state.items())
