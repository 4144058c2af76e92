"""A spatial mean of uint8 codes is written as GlobalAveragePool; ONNX Runtime runs it as an integer kernel."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from torch import nn

import qgraph
from qgraph.backends.onnx.emitter import write_onnx
from qgraph.demo import output_scale


class Pooled(nn.Module):
    """conv → ReLU → mean over (dims, keepdim) → linear."""

    def __init__(self, dims=(-1, -2), keepdim=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean(self.dims, keepdim=self.keepdim)
        return self.fc(y.flatten(1))


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _ort_optimized_ops(path, tmp_path) -> Counter:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _ops(options.optimized_model_filepath)


def _onnx(model: nn.Module, x: torch.Tensor, backend: str | None, path) -> tuple[str, torch.nn.Module]:
    """``model`` written as ONNX: float (``backend=None``) or PTQ-quantized for ``backend``."""
    if backend is None:
        return write_onnx(model, (x,), None, path), model
    g = torch.Generator().manual_seed(1)
    p = qgraph.prepare_ptq(model, (x,), backend=backend)
    qgraph.calibrate(p, [torch.randn(4, *x.shape[1:], generator=g) for _ in range(2)], progress=False)
    q = qgraph.convert(p)
    return qgraph.export_onnx(q, (x,), path), q


@pytest.mark.parametrize("dims", [(-1, -2), (2, 3), (3, 2)])
def test_x86_spatial_mean_becomes_global_average_pool(dims, tmp_path):
    torch.manual_seed(0)
    path, _ = _onnx(Pooled(dims).eval(), torch.randn(2, 3, 10, 12), "x86", tmp_path / "m.onnx")
    ops = _ops(path)
    assert ops["GlobalAveragePool"] == 1 and ops["ReduceMean"] == 0
    graph = onnx.load(str(path)).graph
    read = {name for node in graph.node for name in node.input}
    assert [t.name for t in graph.initializer if t.name not in read] == []  # the axes went with ReduceMean


@pytest.mark.parametrize("dims, keepdim", [((-1, -2), False), ((1,), True), ((-1,), True)])
def test_other_means_stay_reduce_mean(dims, keepdim, tmp_path):
    torch.manual_seed(0)
    model, x = Pooled(dims, keepdim).eval(), torch.randn(2, 3, 10, 12)
    if dims == (1,):  # mean over channels: fc takes H·W features then
        model.fc = nn.Linear(120, 4)
    elif dims == (-1,):
        model.fc = nn.Linear(80, 4)
    path, _ = _onnx(model, x, "x86", tmp_path / "m.onnx")
    ops = _ops(path)
    assert ops["ReduceMean"] == 1 and ops["GlobalAveragePool"] == 0


@pytest.mark.parametrize("backend", [None, "xnnpack"])
def test_float_and_int8_means_stay_reduce_mean(backend, tmp_path):
    """A float mean gains nothing; a mean of int8 codes (the XNNPACK scheme's model in ONNX
    Runtime) would round more pooled values off the converted graph (module docstring)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 12)
    path, model = _onnx(Pooled().eval(), x, backend, tmp_path / "m.onnx")
    ops = _ops(path)
    assert ops["ReduceMean"] == 1 and ops["GlobalAveragePool"] == 0
    if backend is None:  # the float model is unchanged: the file computes what it computes
        with torch.no_grad():
            assert torch.allclose(qgraph.load_onnx(path)(x), model(x), atol=1e-5)


def test_x86_pooling_runs_as_qlinear_global_average_pool(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, 12, generator=g)
    path, q = _onnx(Pooled().eval(), x, "x86", tmp_path / "m.onnx")
    assert _ort_optimized_ops(path, tmp_path)["QLinearGlobalAveragePool"] == 1
    # The integer average rounds once where the converted graph rounds the float mean: a
    # pooled code may differ by one step, which the linear layer scales by |w|·s_pool/s_out
    # before its own rounding. One output step is the bound.
    with torch.no_grad():
        ref = q(x)
    assert (qgraph.load_onnx(path)(x) - ref).abs().max().item() <= 1 * output_scale(q) * (1 + 1e-3)
