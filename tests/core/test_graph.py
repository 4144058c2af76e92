"""Graph helpers: provenance records equal torch's own, without copying the history."""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.traceback import NodeSource, NodeSourceAction

from qgraph.core.graph import copy_provenance


def _graph_with_history() -> tuple[torch.fx.Graph, torch.fx.Node]:
    """x → relu → neg, where neg's history is two passes deep."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    relu = graph.call_function(torch.ops.aten.relu.default, (x,))
    relu.meta["stack_trace"] = "model.py:3"
    relu.meta["from_node"] = [NodeSource(x, "first_pass", NodeSourceAction.CREATE)]
    neg = graph.call_function(torch.ops.aten.neg.default, (relu,))
    copy_provenance(neg, relu, "second_pass")
    graph.output(neg)
    return graph, neg


def test_record_is_what_torch_would_write():
    graph, neg = _graph_with_history()
    new = graph.call_function(torch.ops.aten.abs.default, (neg,))
    copy_provenance(new, neg, "third_pass", action="replace")
    (ours,) = new.meta["from_node"]
    theirs = NodeSource(neg, "third_pass", NodeSourceAction.REPLACE)  # deep-copies the history
    assert ours.to_dict() == theirs.to_dict()
    assert [s.pass_name for s in ours.from_node] == ["second_pass"]
    assert [s.pass_name for s in ours.from_node[0].from_node] == ["first_pass"]
    assert new.meta["stack_trace"] == "model.py:3"


def test_history_is_shared_not_copied_and_lists_are_own():
    graph, neg = _graph_with_history()
    a = graph.call_function(torch.ops.aten.abs.default, (neg,))
    b = graph.call_function(torch.ops.aten.abs.default, (neg,))
    copy_provenance(a, neg, "p")
    copy_provenance(b, neg, "p")
    assert a.meta["from_node"][0].from_node[0] is neg.meta["from_node"][0]  # shared record
    a.meta["from_node"].append(NodeSource(None, "later"))  # a node's own list: others unchanged
    assert len(b.meta["from_node"]) == 1
    assert a.meta["from_node"][0].from_node is not neg.meta["from_node"]
