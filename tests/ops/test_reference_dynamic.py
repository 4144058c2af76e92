"""Dynamic reference kernels (:mod:`qgraph.ops.reference_dynamic`) and their lowering.

* **Property tests** (hypothesis) over random shapes, ranges, granularities (per tensor,
  per token; per channel, per group) and runtimes: the chosen grid covers the input's range
  with 0 exactly on it, and the float output equals a float64 computation of the same
  integer math to float32 rounding.
* **The pass** (:class:`LowerDynamicReference`): structure (every dynamic layer one kernel,
  no run-time qparam ops left, provenance kept) and numerics against the converted graph.
* **The runtimes**: the dynamic ``.pte`` (conv + linears, and 8da4w) and the x86 ``.onnx``
  against the reference, fed the same input.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph.ops.qdq import qd
from qgraph.ops.reference_dynamic import dynamic_qparams
from qgraph.passes.lower.lower_dynamic_reference import LowerDynamicReference
from qgraph.recipes.lowbit import int8_dynamic_int4_weight
from tests.conftest import count_ops, run_pass

ref = torch.ops.qgraph_ref
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
"""Derandomized (the same examples each run) and without shrinking, as in test_reference_kernels."""
F32_EPS = 2.0**-24
RUNTIME_QPARAM_OPS = {
    qd.choose_qparams.tensor,
    qd.choose_qparams_per_token_asymmetric.default,
    qd.quantize_per_token.default,
    qd.quantize_per_tensor.tensor,
    qd.dequantize_per_channel_group.default,
}


def _grid(runtime: str, per_token: bool) -> tuple[int, int]:
    """ONNX Runtime's per-tensor ``DynamicQuantizeLinear`` is uint8; everything else int8."""
    return (0, 255) if runtime == "onnxruntime" and not per_token else (-128, 127)


@SETTINGS
@given(
    rows=st.integers(1, 4),
    groups=st.integers(1, 3),
    n=st.integers(1, 6),
    per_token=st.booleans(),
    grouped=st.booleans(),
    runtime=st.sampled_from(["xnnpack", "onnxruntime"]),
    spread=st.floats(1e-3, 1e3),
    offset=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_dynamic_linear_is_the_integer_math_of_its_grid(rows, groups, n, per_token, grouped, runtime, spread, offset, seed):
    """Grid: every input within half a step of its code's value and 0 exactly on the grid.
    Output: the float64 value of ``Σ_k (q - zp) · w · s · s_w + b`` from codes rounded in
    float64, within ``4 · 2^-24`` of ``Σ|terms|`` per group (the kernel's float32 roundings)
    plus one step of ``s · |w_k| · s_w`` for each input that lies within ``1e-5`` steps of a
    rounding tie (where ``x · fl(1/s)`` and ``x / s`` may round apart)."""
    grouped = grouped and runtime == "xnnpack"  # per-group kernels are XNNPACK's (MatMulNBits is not lowered)
    group = 32
    k = group * groups
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g) + offset) * spread
    w = torch.randint(-8 if grouped else -127, 8 if grouped else 128, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, groups if grouped else 1, generator=g) * 0.1 + 1e-3
    w_scale = w_scale if grouped else w_scale.reshape(n)
    bias = torch.randn(n, generator=g)
    qmin, qmax = _grid(runtime, per_token)

    y = ref.dynamic_linear(x, w, w_scale, bias, group if grouped else 0, per_token, qmin, qmax, runtime)

    s, zp, _ = dynamic_qparams(x if per_token else x.reshape(1, -1), qmin, qmax, runtime, per_token)
    s, zp = (s.expand(rows), zp.expand(rows)) if not per_token else (s, zp)
    assert bool(((zp >= qmin) & (zp <= qmax)).all())
    steps = x.double() / s.double()[:, None]
    codes = (torch.round(steps) + zp[:, None]).clamp(qmin, qmax)
    values = (codes - zp[:, None]) * s.double()[:, None]
    lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    inside = (x >= (lo if per_token else lo.min())) & (x <= (hi if per_token else hi.max()))
    assert bool(((values - x.double()).abs()[inside] <= 0.5 * s.double()[:, None].expand_as(x)[inside] * (1 + 1e-4)).all())

    near_tie = ((steps - torch.floor(steps)) - 0.5).abs() <= 1e-5
    scale_k = w_scale.double().repeat_interleave(group, dim=1) if grouped else w_scale.double()[:, None].expand(n, k)
    terms = (codes - zp[:, None]).double()[:, None, :] * w.double()[None] * scale_k[None] * s.double()[:, None, None]
    expected = terms.sum(-1) + bias.double()
    tol = 4 * F32_EPS * (terms.abs().sum(-1) * groups + bias.double().abs())
    tol = tol + (near_tie.double()[:, None, :] * (s.double()[:, None, None] * w.double().abs()[None] * scale_k[None])).sum(-1)
    assert bool(((y.double() - expected).abs() <= tol + 1e-30).all()), (y.double() - expected).abs().max()


@SETTINGS
@given(
    channels=st.integers(1, 4),
    out_channels=st.integers(1, 4),
    size=st.integers(3, 6),
    runtime=st.sampled_from(["xnnpack", "onnxruntime"]),
    spread=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
def test_dynamic_conv_is_the_integer_math_of_its_grid(channels, out_channels, size, runtime, spread, seed):
    """Against a float64 conv of the dequantized codes: within ``4 · 2^-24`` of the
    conv of the absolute values, plus a step per input near a tie, as for the linear."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, size, size, generator=g) * spread
    w = torch.randint(-127, 128, (out_channels, channels, 3, 3), generator=g, dtype=torch.int8)
    w_scale = torch.rand(out_channels, generator=g) * 0.1 + 1e-3
    bias = torch.randn(out_channels, generator=g)
    qmin, qmax = _grid(runtime, False)
    y = ref.dynamic_conv(x, w, w_scale, bias, [1, 1], [1, 1], [1, 1], 1, qmin, qmax, runtime)

    s, zp, _ = dynamic_qparams(x.reshape(1, -1), qmin, qmax, runtime, False)
    steps = x.double() / s.double()
    codes = (torch.round(steps) + zp).clamp(qmin, qmax)
    w64 = w.double() * w_scale.double().reshape(-1, 1, 1, 1)
    expected = torch.nn.functional.conv2d((codes - zp) * s.double(), w64, bias.double(), padding=1)
    magnitude = torch.nn.functional.conv2d(((codes - zp) * s.double()).abs(), w64.abs(), bias.double().abs(), padding=1)
    near_tie = (((steps - torch.floor(steps)) - 0.5).abs() <= 1e-5).double() * s.double()
    flips = torch.nn.functional.conv2d(near_tie, w64.abs(), padding=1)
    assert bool(((y.double() - expected).abs() <= 4 * F32_EPS * magnitude + flips + 1e-30).all())


# ------------------------------------------------------------------------------ the pass


class ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(128, 256)
        self.fc2 = nn.Linear(256, 64)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _image() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _tokens() -> torch.Tensor:
    return torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(0))


def _8da4w() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    p = qgraph.prepare_qat(TwoLinears().eval(), (_tokens(),), config=qgraph.QConfig(scheme=int8_dynamic_int4_weight(32)))
    return qgraph.convert(p)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("backend", ["xnnpack", "x86"])
def test_every_dynamic_layer_becomes_one_kernel(backend):
    torch.manual_seed(0)
    q = qgraph.quantize_dynamic(ConvLinear().eval(), (_image(),), backend=backend)
    before = {n.name: n.target for n in q.graph.nodes}
    runtime = "xnnpack" if backend == "xnnpack" else "onnxruntime"
    lowering = LowerDynamicReference(runtime)
    result = run_pass(lowering, copy.deepcopy(q))
    gm = result.graph_module
    ops = count_ops(gm)
    assert result.modified and not lowering.skipped
    assert ops[ref.dynamic_conv.default] == 1 and ops[ref.dynamic_linear.default] == 2
    assert not any(ops[op] for op in RUNTIME_QPARAM_OPS)
    assert ops[torch.ops.aten.linear.default] == ops[torch.ops.aten.conv2d.default] == 0
    for node in gm.graph.nodes:
        if node.target in (ref.dynamic_conv.default, ref.dynamic_linear.default):
            assert node.meta["from_node"][-1].pass_name == "lower_dynamic_reference"
            assert node.meta.get("nn_module_stack")  # the layer's module, as before
    assert {n.name: n.target for n in q.graph.nodes} == before  # lowered a copy
    # The same integers, the float tail in another order: float32 rounding apart.
    assert _rel(gm(_image()), q(_image())) <= 1e-5


def test_8da4w_group_weights_lower_for_xnnpack_and_stay_qdq_for_onnxruntime():
    q = _8da4w()
    lowered = qgraph.lower(q, target="xnnpack")
    assert count_ops(lowered)[ref.dynamic_linear.default] == 2
    assert count_ops(lowered)[qd.dequantize_per_channel_group.default] == 0
    assert _rel(lowered(_tokens()), q(_tokens())) <= 1e-5
    lowering = LowerDynamicReference("onnxruntime")
    result = run_pass(lowering, copy.deepcopy(q))
    assert not result.modified and all("MatMulNBits" in why for why in lowering.skipped.values())
    assert len(lowering.skipped) == 2


# ------------------------------------------------------------------------------ the runtimes


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference in units of float32's spacing at the output's largest magnitude."""
    return ((got - want).abs().max() / (want.abs().max() * 2.0**-23)).item()


@pytest.mark.parametrize("case", ["xnnpack-pte", "8da4w-pte", "x86-onnx"])
def test_runtimes_compute_the_reference(case, tmp_path, record_property):
    """Measured here: 0 ulp in all three (bit for bit). The bound, 2 ulp of the largest
    output, allows a runtime's micro-kernel for another CPU to fuse one more multiply-add;
    a wrong zero point, scale or grid moves outputs by whole steps (≈ 2^16 ulp and more)."""
    if case == "8da4w-pte":
        q, x = _8da4w(), _tokens()[:1]
    else:
        torch.manual_seed(0)
        backend = case.split("-")[0]
        q, x = qgraph.quantize_dynamic(ConvLinear().eval(), (_image(),), backend=backend), _image()
    if case.endswith("pte"):
        x = x[:1]  # XNNPACK picks a linear's range per row and a conv's per image: batch 1 is the graph's choice
        run = qgraph.load_pte(qgraph.export_pte(q, (x,), tmp_path / "m.pte").path)
        target = "xnnpack"
    else:
        run = qgraph.load_onnx(qgraph.export_onnx(q, (x,), tmp_path / "m.onnx"))
        target = "x86"
    want = qgraph.lower(q, target=target)(x)
    ulps = _ulps(run(x), want)
    record_property("ulps", ulps)
    assert ulps <= 2.0
