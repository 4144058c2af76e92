"""ResolveSpecs: shared points form one group with one spec; conflicts are errors."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import nn

import qgraph
from qgraph.backends.rules.xnnpack import XNNPACK
from qgraph.core.errors import ConfigError
from qgraph.core.meta import ANNOTATION_KEY, GROUPS_KEY
from qgraph.passes.prepare.annotate import Annotate
from qgraph.passes.prepare.fold_conv_bn import FoldConvBn
from qgraph.passes.prepare.resolve_specs import ResolveSpecs, agreed_spec
from qgraph.quant.specs import QuantAnnotation, QuantSpec, SharedSpec


class _CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


def _resolved(model, x):
    gm = qgraph.eval_mode(qgraph.capture(model, (x,)))
    gm = FoldConvBn()(gm).graph_module
    gm = Annotate(XNNPACK, is_qat=False)(gm).graph_module
    return ResolveSpecs()(gm)


def test_cat_inputs_and_output_are_one_group(image_batch):
    result = _resolved(_CatNet(), image_batch)
    assert result.modified
    groups = result.graph_module.meta[GROUPS_KEY]
    cat_group = next(g for g in groups if "cat" in g.outputs)
    # Both producers are observed at their outputs with the cat's qparams: no requantization.
    assert {"conv2d", "conv2d_1", "cat"} == set(cat_group.outputs) and cat_group.edges == []
    # input x feeds two convs: one group, two edges; each conv weight its own group.
    x_group = next(g for g in groups if any(e[0] == "x" for e in g.edges))
    assert len(x_group.edges) == 2
    weight_groups = [g for g in groups if g.spec.is_per_channel]
    assert len(weight_groups) == 3


def test_resolving_changes_no_node_and_no_output(conv_bn_net, image_batch):
    gm = qgraph.eval_mode(qgraph.capture(conv_bn_net, (image_batch,)))
    gm = FoldConvBn()(gm).graph_module
    gm = Annotate(XNNPACK, is_qat=False)(gm).graph_module
    gm.recompile()
    code, expected = gm.code, gm(image_batch)
    gm = ResolveSpecs()(gm).graph_module
    gm.recompile()
    assert gm.code == code and torch.equal(gm(image_batch), expected)


def test_consumer_edges_join_the_producer_output_group(conv_bn_net, image_batch):
    groups = _resolved(conv_bn_net, image_batch).graph_module.meta[GROUPS_KEY]
    relu_group = next(g for g in groups if "relu" in g.outputs)
    assert relu_group.edges == []  # conv2 reads relu's quantized output, no edge quantizer


class _AddNet(nn.Module):
    def forward(self, x):
        return torch.relu(x) + torch.sigmoid(x)


def test_a_chain_of_shared_specs_is_one_group_with_the_root_spec(image_batch):
    gm = qgraph.capture(_AddNet(), (image_batch,))
    relu, sigmoid, add = [n for n in gm.graph.nodes if n.op == "call_function"]
    four_bit = QuantSpec(bits=4)
    # sigmoid edge -> add output -> relu edge (concrete): all three are one group.
    add.meta[ANNOTATION_KEY] = QuantAnnotation(
        "test",
        add.name,
        inputs={relu.name: four_bit, sigmoid.name: SharedSpec(add.name)},
        output=SharedSpec((relu.name, add.name)),
    )
    result = ResolveSpecs()(gm)
    (group,) = result.graph_module.meta[GROUPS_KEY]
    assert group.spec == four_bit and group.outputs == [add.name]
    assert sorted(group.edges) == sorted([(relu.name, add.name), (sigmoid.name, add.name)])
    assert not ResolveSpecs()(result.graph_module).modified  # same groups again


def test_two_specs_tied_together_are_an_error_that_names_the_chain():
    """Points a and b, with different specs, tied through the two input edges of a cat: the
    error names both points, both specs and each tie on the shortest path between them.

    One annotation per node gives each point one spec and each shared spec names one other
    point, so annotations cannot tie two concrete specs (a component with k concrete points
    has at most n - k ties but needs n - 1); the ties are built here as the pass builds them."""
    int8, four_bit = QuantSpec(), QuantSpec(bits=4)
    ties = nx.Graph()
    ties.add_edge(("a", "cat"), "a", why="rule 'cat' at 'cat'")
    ties.add_edge(("a", "cat"), ("b", "cat"), why="rule 'cat' at 'cat'")
    ties.add_edge(("b", "cat"), "b", why="rule 'fixed' at 'b'")
    ties.add_edge(("a", "cat"), "cat", why="rule 'cat' at 'cat'")  # a side branch: not on the path
    concrete = {"a": int8, "b": four_bit}
    with pytest.raises(ConfigError) as info:
        agreed_spec(ties, set(ties), concrete)
    message = str(info.value)
    assert message.startswith("output of 'a' and output of 'b' must share one set of qparams")
    assert f"{int8.short()} and {four_bit.short()}" in message
    chain = (
        "output of 'a' ~[rule 'cat' at 'cat']~ edge 'a' -> 'cat' ~[rule 'cat' at 'cat']~ edge 'b' -> 'cat' "
        "~[rule 'fixed' at 'b']~ output of 'b'"
    )
    assert f"tied by: {chain}." in message
    # One concrete spec (or none) in a component is its spec.
    assert agreed_spec(ties, set(ties), {"a": int8, ("b", "cat"): int8}) == int8
    assert agreed_spec(ties, set(ties), {}) is None

