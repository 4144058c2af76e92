"""StochasticDepth: a training-mode capture's random mask becomes a mode-aware op."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth as TvStochasticDepth

import qgraph
from qgraph.core.graph import is_op
from qgraph.demo import output_scale
from qgraph.ops.stochastic_depth import EVAL_IDENTITY_OPS, STOCHASTIC_DEPTH
from qgraph.passes.prepare.stochastic_depth import StochasticDepth
from tests.conftest import count_ops, run_pass

aten = torch.ops.aten


class Residual(nn.Module):
    def __init__(self, mode: str, p: float = 0.5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.sd = TvStochasticDepth(p, mode)

    def forward(self, x):
        return x + self.sd(self.conv(x))


def _x() -> torch.Tensor:
    return torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_mask_becomes_one_op_that_draws_the_same_mask(mode):
    torch.manual_seed(0)
    captured = qgraph.capture(Residual(mode).train(), (_x(),))
    assert count_ops(captured)[aten.bernoulli_.float] == 1
    torch.manual_seed(1)
    expected = captured(_x())
    result = run_pass(StochasticDepth(), captured)
    gm = result.graph_module
    ops = count_ops(gm)
    assert result.modified
    assert ops[STOCHASTIC_DEPTH] == 1
    assert ops[aten.bernoulli_.float] == ops[aten.empty.memory_format] == ops[aten.mul.Tensor] == 0
    sd = next(n for n in gm.graph.nodes if n.target == STOCHASTIC_DEPTH)
    assert sd.args[1:] == (pytest.approx(0.5), True, mode == "row")
    # Same ops on the same random stream: the very mask the captured graph drew (exact).
    torch.manual_seed(1)
    assert torch.equal(gm(_x()), expected)
    assert not StochasticDepth()(gm).modified


def test_row_mode_drops_whole_samples_and_scales_the_rest():
    x = torch.ones(64, 2, 3)
    torch.manual_seed(0)
    y = STOCHASTIC_DEPTH(x, 0.25, True, True)
    per_sample = y.reshape(64, -1)
    # Each sample is either all 0 or all 1/keep: one draw per row.
    assert all(r.unique().numel() == 1 for r in per_sample)
    first = per_sample[:, 0]
    dropped, kept = first == 0, torch.isclose(first, torch.tensor(1 / 0.75))
    assert (dropped | kept).all() and dropped.any() and kept.any()
    assert torch.equal(STOCHASTIC_DEPTH(x, 0.25, False, True), x)


def test_eval_capture_holds_no_mask_and_the_pass_changes_nothing():
    gm = qgraph.capture(Residual("row").eval(), (_x(),))
    assert not StochasticDepth()(gm).modified


def test_qat_model_is_deterministic_in_eval_and_convert_removes_the_op():
    torch.manual_seed(0)
    model = Residual("row").train()
    prepared = qgraph.prepare_qat(model, (_x(),))
    assert sum(1 for n in prepared.graph.nodes if is_op(n, EVAL_IDENTITY_OPS)) == 1
    torch.manual_seed(0)
    a = prepared(_x())
    b = prepared(_x())
    assert not torch.equal(a, b)  # training: random branches (p = 0.5 on 8 samples)
    prepared.eval()
    a, b = prepared(_x()), prepared(_x())
    assert torch.equal(a, b)
    converted = qgraph.convert(prepared)
    assert count_ops(converted)[STOCHASTIC_DEPTH] == 0
    # Eval fake-quant and the converted graph share qparams: equal within one output step
    # (fake_quantize and quantize→dequantize may round a tie differently).
    step = output_scale(converted)
    assert (converted(_x()) - a).abs().max().item() <= step * (1 + 1e-3)
