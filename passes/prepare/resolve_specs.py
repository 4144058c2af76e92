"""Resolve specs: group the quantized points that must share one set of qparams.

A *point* is a node's output (its name) or one edge ``(producer, consumer)``. The points
and the ties between them form an undirected networkx graph: every :class:`SharedSpec`
("shares qparams with", written by the rules' ``list_shared`` / ``follow`` roles and
pass-through outputs) is an edge labelled with the rule and node that asked for it. Its
connected components are the *groups*, each of which gets one observer or fake-quant module
later.

Two more kinds of tie join components whose specs are equal. An input edge whose spec (its
own, or its group's) equals the spec of its producer's output joins the producer's group:
``conv → relu → conv`` quantizes the relu output once, not once per consumer, and the inputs
of a cat are quantized at their producers with the cat's qparams. Edges that read one float
producer with one spec are one group, quantized once.

Two different concrete specs tied by shared specs are an error (the rules contradict each
other) that names the two points and the shortest chain of ties between them. With the specs a rule table can express (one spec per point, a shared spec naming
one other point) it cannot happen, so it marks a bug.

The result is stored as a list of :class:`QuantGroup` in ``gm.meta['qgraph_groups']``;
edges with a :class:`DerivedSpec` (int32 biases) go to ``gm.meta['qgraph_derived']``, each
naming the points whose qparams it is computed from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch.fx

from qgraph.core.errors import ConfigError
from qgraph.core.meta import ANNOTATION_KEY, DERIVED_KEY, GROUPS_KEY
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.passes.prepare.annotate import Annotate
from qgraph.quant.specs import DerivedSpec, Point, QuantSpec, SharedSpec


@dataclass
class QuantGroup:
    """Points that share one set of qparams, and the spec they share."""

    spec: QuantSpec
    outputs: list[str] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)
    members: list[Point] = field(default_factory=list)
    """Every point of the group, also the edges that need no quantizer of their own."""

    @property
    def name(self) -> str:
        first = self.outputs[0] if self.outputs else "__".join(self.edges[0])
        return first


class ResolveSpecs(Pass):
    """Turn per-node annotations into groups of points with one spec each."""

    name = "resolve_specs"
    requires = (Annotate,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        ties = nx.Graph()
        concrete: dict[Point, QuantSpec] = {}
        derived: list[tuple[tuple[str, str], DerivedSpec]] = []
        edges: list[tuple[str, str]] = []
        outputs: list[str] = []
        for node in gm.graph.nodes:
            ann = node.meta.get(ANNOTATION_KEY)
            if ann is None:
                continue
            why = f"rule {ann.rule!r} at {node.name!r}"
            if ann.output is not None:
                outputs.append(node.name)
                _attach(ties, concrete, node.name, ann.output, why)
            for producer, spec in ann.inputs.items():
                edge = (producer, node.name)
                if isinstance(spec, DerivedSpec):
                    derived.append((edge, spec))
                    continue
                edges.append(edge)
                _attach(ties, concrete, edge, spec, why)
        spec_of: dict[Point, QuantSpec | None] = {}
        for component in nx.connected_components(ties):
            spec = agreed_spec(ties, component, concrete)
            spec_of.update(dict.fromkeys(component, spec))

        # Join an edge to its producer's output group when both carry the same spec, so that
        # e.g. every input of a cat is observed once, at its producer, with the cat's qparams,
        # instead of being requantized on the edge. Ties join equal specs only: every
        # component keeps its spec.
        output_set = set(outputs)
        first_edge: dict[tuple[str, QuantSpec], tuple[str, str]] = {}
        for edge in edges:
            producer, spec = edge[0], spec_of[edge]
            if spec is None:
                continue
            if producer in output_set:
                if spec == spec_of[producer]:
                    ties.add_edge(producer, edge, why="same spec as the producer's output")
            elif (producer, spec) in first_edge:
                # Edges that read one float producer with one spec quantize it once, not per consumer.
                ties.add_edge(first_edge[producer, spec], edge, why="same producer and spec")
            else:
                first_edge[producer, spec] = edge

        group_of = {p: i for i, component in enumerate(nx.connected_components(ties)) for p in component}
        members: dict[int, list[Point]] = {}
        for point in [*outputs, *edges]:
            members.setdefault(group_of[point], []).append(point)
        result = []
        for points in members.values():
            spec = spec_of[points[0]]
            if spec is None:
                continue  # shared with nothing concrete: stays float
            group = QuantGroup(spec=spec, members=list(points))
            for p in points:
                if isinstance(p, str):
                    group.outputs.append(p)
                else:
                    group.edges.append(p)
            # Edges inside an output group need no quantizer of their own.
            group.edges = [e for e in group.edges if e[0] not in group.outputs]
            result.append(group)
        quantized = {p for g in result for p in g.members}
        for edge, spec in derived:
            missing = [p for p in spec.points if p not in quantized]
            if missing:
                raise ConfigError(f"the derived spec of {edge} needs qparams of {missing}, which are not quantized")
        previous = (gm.meta.get(GROUPS_KEY), gm.meta.get(DERIVED_KEY))
        gm.meta[GROUPS_KEY] = result
        gm.meta[DERIVED_KEY] = derived
        return PassResult(gm, modified=previous != (result, derived))


def _attach(ties: nx.Graph, concrete: dict[Point, QuantSpec], point: Point, spec: object, why: str) -> None:
    ties.add_node(point)
    if isinstance(spec, SharedSpec):
        ties.add_edge(spec.point, point, why=why)
    elif isinstance(spec, QuantSpec):
        concrete[point] = spec
    else:
        raise ConfigError(f"spec {type(spec).__name__} on {point} is not supported by this pipeline yet")


def agreed_spec(ties: nx.Graph, component: set[Point], concrete: dict[Point, QuantSpec]) -> QuantSpec | None:
    """The one concrete spec of a connected ``component`` of ``ties`` (None: it stays float).

    Two different specs in one component are a :class:`ConfigError` naming two points that
    carry them and the shortest chain of ties between them, each tie with the rule and node
    that made it (the edge attribute ``why``).
    """
    specs = {concrete[p] for p in component if p in concrete}
    if len(specs) <= 1:
        return next(iter(specs), None)
    carriers = sorted((p for p in component if p in concrete), key=str)
    a = carriers[0]
    b = next(p for p in carriers if concrete[p] != concrete[a])
    path = nx.shortest_path(ties, a, b)
    chain = _describe(path[0]) + "".join(
        f" ~[{ties.edges[u, v].get('why', 'tied')}]~ {_describe(v)}" for u, v in zip(path, path[1:])
    )
    raise ConfigError(
        f"{_describe(a)} and {_describe(b)} must share one set of qparams but were given different specs "
        f"{concrete[a].short()} and {concrete[b].short()}; they are tied by: {chain}. Make the backend rules agree"
    )


def _describe(point: Point) -> str:
    return f"output of {point!r}" if isinstance(point, str) else f"edge {point[0]!r} -> {point[1]!r}"
