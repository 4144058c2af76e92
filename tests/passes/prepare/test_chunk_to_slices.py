"""ChunkToSlices: chunk / split pieces become slices on the input's grid."""

from __future__ import annotations

import operator

import torch
from torch import nn

import qgraph
from qgraph.core.meta import ANNOTATION_KEY
from qgraph.passes.prepare.chunk_to_slices import ChunkToSlices
from qgraph.quant.specs import SharedSpec
from tests.conftest import count_ops, run_pass

aten = torch.ops.aten


class Splits(nn.Module):
    """ShuffleNet's channel split, an uneven split and explicit sizes, all along channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 1)
        self.branch = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        a, b = y.chunk(2, dim=1)  # sizes 4, 3
        c, d, e = torch.split(y, 3, dim=1)  # sizes 3, 3, 1
        f, g = torch.split(y, [2, 5], dim=1)
        return torch.cat([a, self.branch(b), c * d, e, f, g], dim=1)


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def test_pieces_become_slices_with_the_same_values():
    torch.manual_seed(0)
    gm = qgraph.capture(Splits().eval(), (_x(),))
    before = count_ops(gm)
    assert before[aten.chunk.default] == 1 and before[aten.split.Tensor] + before[aten.split_with_sizes.default] == 2
    expected = gm(_x())
    result = run_pass(ChunkToSlices(), gm)
    out = result.graph_module
    ops = count_ops(out)
    assert result.modified
    assert ops[aten.chunk.default] == ops[aten.split.Tensor] == ops[aten.split_with_sizes.default] == 0
    assert ops[operator.getitem] == 0 and ops[aten.slice.Tensor] == 7
    bounds = sorted(n.args[1:] for n in out.graph.nodes if n.target == aten.slice.Tensor)
    assert bounds == sorted([(1, 0, 4), (1, 4, 7), (1, 0, 3), (1, 3, 6), (1, 6, 7), (1, 0, 2), (1, 2, 7)])
    assert torch.equal(out(_x()), expected)  # the same elements: exact
    assert not ChunkToSlices()(out).modified


def test_a_split_along_the_dynamic_batch_dim_is_left_alone():
    class BatchSplit(nn.Module):
        def forward(self, x):
            a, b = x.chunk(2, dim=0)
            return a + b

    gm = qgraph.capture(BatchSplit(), (_x(),))
    assert not ChunkToSlices()(gm).modified


def test_slices_share_the_qparams_of_the_split_tensor():
    torch.manual_seed(0)
    prepared = qgraph.prepare_ptq(Splits().eval(), (_x(),))
    slices = [n for n in prepared.graph.nodes if n.target == aten.slice.Tensor]
    assert len(slices) == 7
    for s in slices:
        ann = s.meta[ANNOTATION_KEY]
        assert ann.rule == "shape" and isinstance(ann.output, SharedSpec)
