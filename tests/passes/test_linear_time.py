"""Every stage of the pipeline visits each node a bounded number of times: no timing needed.

A pass that scans the whole graph once per match (a name→node map per conv, a search for a
conv's tail per conv) does ``k × N`` node visits for ``k`` matches in an ``N``-node graph:
quadratic in a chain of conv-bn-relu blocks. The guard counts the nodes yielded by every
iteration of a ``torch.fx.Graph``'s node list (``for n in graph.nodes``, ``reversed(...)``,
``list(...)``, a dict comprehension; torch's own ``lint`` and code generation included)
while one stage runs, on a chain of ``n`` and of ``2n`` blocks.

Linear work is ``a + b·n`` visits with ``a, b ≥ 0``, so doubling ``n`` at most doubles it:
the ratio is ≤ 2 exactly, whatever the constants, and counts are deterministic, so the
bound needs no slack for noise. A scan per conv adds ``c·n²`` and pushes the ratio toward 4.
Measured at 6 → 12 blocks: with the per-conv scans this file was written against, 3.69
(``fuse_conv_bn_qat``), 3.27 (``fold_bn``), 3.09 / 3.38 (``eval_mode`` / ``train_mode``),
2.66 (``convert``), 2.29 (``prepare_qat``), 2.11 (``prepare_ptq``); without them 1.88 to 1.94.
Graph code generation (``recompile``) must also run a fixed number of times per stage, not
once per node.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx

import qgraph
from qgraph.api.modes import eval_mode, freeze_bn_stats, freeze_observers, train_mode
from qgraph.core.graph import copy_graph_module
from qgraph.models.chain import ConvBnReluChain
from qgraph.passes.convert.fold_bn import FoldBn
from qgraph.passes.prepare.fuse_conv_bn_qat import FuseConvBnQat
from qgraph.passes.prepare.simulated_bn import set_simulated_bn_form

BLOCKS = 6  # and twice as many; small enough to capture in a second or two
_NodeList = type(torch.fx.Graph().nodes)


class Visits:
    """Counts nodes yielded by any graph's node list, and ``GraphModule.recompile`` calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.nodes = 0
        self.recompiles = 0
        visits = self
        forward, backward, recompile = _NodeList.__iter__, _NodeList.__reversed__, torch.fx.GraphModule.recompile

        def counted(nodes):
            for node in nodes:
                visits.nodes += 1
                yield node

        def counting_recompile(gm, *args, **kwargs):
            visits.recompiles += 1
            return recompile(gm, *args, **kwargs)

        monkeypatch.setattr(_NodeList, "__iter__", lambda self: counted(forward(self)))
        monkeypatch.setattr(_NodeList, "__reversed__", lambda self: counted(backward(self)))
        monkeypatch.setattr(torch.fx.GraphModule, "recompile", counting_recompile)

    def of(self, fn, *args) -> tuple[int, int]:
        """(nodes visited, recompiles) while ``fn(*args)`` runs."""
        self.nodes = self.recompiles = 0
        fn(*args)
        return self.nodes, self.recompiles


def _captured(blocks: int) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    return qgraph.capture(ConvBnReluChain(blocks).train(), (x,)), x


@pytest.fixture(scope="module")
def captured():
    return {n: _captured(n) for n in (BLOCKS, 2 * BLOCKS)}


def _trained(captured, blocks: int) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    gm, x = captured[blocks]
    prepared = qgraph.prepare_qat(gm, (x,))
    prepared(x)  # fake-quant ranges for convert
    return prepared, x


def _assert_linear(measure) -> None:
    (small, small_recompiles), (large, large_recompiles) = measure(BLOCKS), measure(2 * BLOCKS)
    assert small > 0, "the counter saw no node visits: torch's node list changed, fix Visits"
    assert large <= 2 * small, f"node visits grew {large / small:.2f}x when the chain doubled ({small} -> {large})"
    assert large_recompiles == small_recompiles, f"recompiles grew with the graph: {small_recompiles} -> {large_recompiles}"


def test_counter_sees_a_quadratic_scan(monkeypatch):
    """The guard can fail: a scan of the graph per node is counted as ``N²`` visits."""
    visits = Visits(monkeypatch)

    def quadratic(blocks):
        graph = torch.fx.Graph()
        for i in range(blocks):
            graph.placeholder(f"x{i}")
        return visits.of(lambda: [sum(1 for _ in graph.nodes) for _ in graph.nodes])

    assert quadratic(BLOCKS) == (BLOCKS * BLOCKS + BLOCKS, 0)
    assert quadratic(2 * BLOCKS)[0] > 2 * quadratic(BLOCKS)[0]


def test_fuse_conv_bn_qat_is_linear(captured, monkeypatch):
    visits = Visits(monkeypatch)
    _assert_linear(lambda n: visits.of(FuseConvBnQat(), copy_graph_module(captured[n][0])))


def test_prepare_qat_and_ptq_are_linear(captured, monkeypatch):
    visits = Visits(monkeypatch)
    _assert_linear(lambda n: visits.of(qgraph.prepare_qat, *captured[n]))
    _assert_linear(lambda n: visits.of(qgraph.prepare_ptq, *captured[n]))


def test_mode_switches_and_freezing_are_linear(captured, monkeypatch):
    prepared = {n: _trained(captured, n)[0] for n in captured}
    visits = Visits(monkeypatch)
    _assert_linear(lambda n: visits.of(eval_mode, prepared[n]))
    _assert_linear(lambda n: visits.of(train_mode, prepared[n]))
    _assert_linear(lambda n: visits.of(set_simulated_bn_form, prepared[n], False, False))
    _assert_linear(lambda n: visits.of(set_simulated_bn_form, prepared[n], True, True))
    _assert_linear(lambda n: visits.of(freeze_bn_stats, prepared[n]))
    # freeze_observers walks the modules (m.modules(), linear), never the graph.
    assert visits.of(freeze_observers, prepared[BLOCKS]) == (0, 0)


def test_fold_bn_and_convert_are_linear(captured, monkeypatch):
    prepared = {n: eval_mode(_trained(captured, n)[0]) for n in captured}
    visits = Visits(monkeypatch)
    _assert_linear(lambda n: visits.of(FoldBn(), copy_graph_module(prepared[n])))
    _assert_linear(lambda n: visits.of(qgraph.convert, prepared[n]))
