"""PteReport: compute inside / outside the XNNPACK delegate, bookkeeping apart, a short table."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import qgraph
from qgraph.backends.executorch import emitter
from qgraph.backends.executorch.emitter import PteReport


class LinearTopK(nn.Module):
    """A linear XNNPACK takes, a top-k it has no kernel for (run by ExecuTorch's portable
    kernels), and the ``getitem`` nodes that unpack multi-output calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, _ = self.fc(x).topk(3, dim=-1)
        return values


@pytest.fixture(scope="module")
def program():
    return torch.export.export(LinearTopK().eval(), (torch.randn(2, 16),))


def test_counts_split_compute_from_bookkeeping(program, tmp_path):
    report = emitter.write_pte(program, tmp_path / "topk.pte")
    assert report.delegated["aten_linear_default"] == 1
    assert report.not_delegated == Counter({"aten_topk_default": 1})
    assert report.bookkeeping["getitem"] >= 1
    assert "getitem" not in report.delegated and "getitem" not in report.not_delegated
    inside = sum(report.delegated.values())
    assert report.delegated_fraction == inside / (inside + 1)
    # Every node ExecuTorch's own report counts is in exactly one of the three counters.
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(emitter.lower(program).exported_program().graph_module)
    counted = sum(report.delegated.values()) + sum(report.not_delegated.values()) + sum(report.bookkeeping.values())
    assert counted == info.num_delegated_nodes + info.num_non_delegated_nodes
    got = qgraph.load_pte(report.path)(x := torch.randn(2, 16))
    with torch.no_grad():
        want = program.module()(x)
    assert torch.allclose(got, want, atol=1e-5)  # float32 linear, another kernel: rounding only


def test_str_is_a_short_table():
    report = PteReport(
        "out/m.pte",
        3 * 1024,
        delegated=Counter({"aten_convolution_default": 2, "aten_linear_default": 1}),
        not_delegated=Counter({"aten_topk_default": 1}),
        bookkeeping=Counter({"getitem": 2}),
    )
    lines = str(report).splitlines()
    assert lines[0] == "out/m.pte: 3.0 KiB; 3 of 4 compute ops inside the XNNPACK delegate (75.0 %)"
    assert lines[1].split() == ["op", "in", "XNNPACK", "outside"]
    rows = [line.split() for line in lines[3:-1]]
    assert rows == [["aten_topk_default", "1"], ["aten_convolution_default", "2"], ["aten_linear_default", "1"]]
    assert lines[3].index("1") > lines[1].index("outside") - 1  # top-k's count sits in the outside column
    assert lines[-1] == "no kernel (bookkeeping): getitem x2"
    assert "getitem" not in "\n".join(lines[:-1])
