"""Resolve specs: group the quantized points that must share one set of qparams.

A *point* is a node's output (its name) or one edge ``(producer, consumer)``. Every
:class:`SharedSpec` is an edge between two points in a union-find; the connected components
are the *groups*, each of which gets one observer or fake-quant module later.

An input edge whose spec (its own, or its group's) equals the spec of its producer's
output is merged into the producer's group: ``conv → relu → conv`` quantizes the relu
output once, not once per consumer, and the inputs of a cat are quantized at their
producers with the cat's qparams. Two different concrete specs in one group are an error (the rules contradict
each other) that names the points; with the specs a rule table can express (one spec per
point, a shared spec naming one other point) it cannot happen, so it marks a bug.

The result is stored as a list of :class:`QuantGroup` in ``gm.meta['qgraph_groups']``;
edges with a :class:`DerivedSpec` (int32 biases) go to ``gm.meta['qgraph_derived']``, each
naming the points whose qparams it is computed from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Point, Point] = {}

    def find(self, p: Point) -> Point:
        self.parent.setdefault(p, p)
        while self.parent[p] != p:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        return p

    def union(self, a: Point, b: Point) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


class ResolveSpecs(Pass):
    """Turn per-node annotations into groups of points with one spec each."""

    name = "resolve_specs"
    requires = (Annotate,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        uf = _UnionFind()
        concrete: dict[Point, QuantSpec] = {}
        derived: list[tuple[tuple[str, str], DerivedSpec]] = []
        edges: list[tuple[str, str]] = []
        outputs: list[str] = []
        for node in gm.graph.nodes:
            ann = node.meta.get(ANNOTATION_KEY)
            if ann is None:
                continue
            if ann.output is not None:
                outputs.append(node.name)
                uf.find(node.name)
                self._attach(uf, concrete, node.name, ann.output)
            for producer, spec in ann.inputs.items():
                edge = (producer, node.name)
                if isinstance(spec, DerivedSpec):
                    derived.append((edge, spec))
                    continue
                edges.append(edge)
                uf.find(edge)
                self._attach(uf, concrete, edge, spec)

        # Merge an edge into its producer's output group when both carry the same spec, so
        # that e.g. every input of a cat is observed once, at its producer, with the cat's
        # qparams, instead of being requantized on the edge.
        output_set = set(outputs)
        root_spec = {uf.find(p): spec for p, spec in concrete.items()}
        for edge in edges:
            producer = edge[0]
            if producer not in output_set:
                continue
            edge_spec, producer_spec = root_spec.get(uf.find(edge)), root_spec.get(uf.find(producer))
            if edge_spec is not None and edge_spec == producer_spec:
                uf.union(producer, edge)
                root_spec[uf.find(producer)] = producer_spec

        # Edges that read one float producer with one spec quantize it once, not per consumer.
        first_edge: dict[tuple[str, QuantSpec], tuple[str, str]] = {}
        for edge in edges:
            spec = root_spec.get(uf.find(edge))
            if edge[0] in output_set or spec is None:
                continue
            key = (edge[0], spec)
            if key in first_edge:
                uf.union(first_edge[key], edge)
            else:
                first_edge[key] = edge

        groups: dict[Point, QuantGroup] = {}
        members: dict[Point, list[Point]] = {}
        for point in [*outputs, *edges]:
            members.setdefault(uf.find(point), []).append(point)
        for root, points in members.items():
            specs = {concrete[p] for p in points if p in concrete}
            if not specs:
                continue  # shared with nothing concrete: stays float
            if len(specs) > 1:
                raise ConfigError(
                    f"points {points} must share qparams but were given different specs "
                    f"{[s.short() for s in specs]}; make the backend rules agree"
                )
            group = QuantGroup(spec=specs.pop(), members=list(points))
            for p in points:
                if isinstance(p, str):
                    group.outputs.append(p)
                else:
                    group.edges.append(p)
            groups[root] = group
        # Edges inside an output group need no quantizer of their own.
        for group in groups.values():
            group.edges = [e for e in group.edges if e[0] not in group.outputs]
        result = list(groups.values())
        members = {p for g in result for p in g.members}
        for edge, spec in derived:
            missing = [p for p in spec.points if p not in members]
            if missing:
                raise ConfigError(f"the derived spec of {edge} needs qparams of {missing}, which are not quantized")
        previous = (gm.meta.get(GROUPS_KEY), gm.meta.get(DERIVED_KEY))
        gm.meta[GROUPS_KEY] = result
        gm.meta[DERIVED_KEY] = derived
        return PassResult(gm, modified=previous != (result, derived))

    @staticmethod
    def _attach(uf: _UnionFind, concrete: dict, point: Point, spec) -> None:
        if isinstance(spec, SharedSpec):
            uf.union(spec.point, point)
        elif isinstance(spec, QuantSpec):
            concrete[point] = spec
        else:
            raise ConfigError(f"spec {type(spec).__name__} on {point} is not supported by this pipeline yet")
