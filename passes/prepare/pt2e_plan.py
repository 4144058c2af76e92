"""The plan a PT2E quantizer's annotations become (not a pass).

:class:`~qgraph.passes.prepare.pt2e_annotate.Pt2eAnnotate` runs the quantizer and records
its decisions, translated to qgraph specs and keyed by node name, as a :class:`Pt2ePlan` in
``gm.meta[PT2E_PLAN_KEY]``; :class:`~qgraph.passes.prepare.apply_pt2e_annotations.ApplyPt2eAnnotations`
writes them onto the graph after conv + BN folding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qgraph.quant.specs import AnySpec


@dataclass
class PlannedNode:
    """One node as the quantizer saw it: its annotation (names as keys), inputs and users.

    ``inputs`` are the names of ``node.all_input_nodes`` in order and ``users`` the
    ``(user, position in the user's all_input_nodes)`` pairs: after conv + BN folding an
    input that was replaced is found at the same position, a removed node as its users' input.
    """

    inputs: list[str]
    users: list[tuple[str, int]]
    input_specs: dict[str, AnySpec] = field(default_factory=dict)
    output: AnySpec | None = None


@dataclass
class Pt2ePlan:
    """The translated annotations of a graph, by node name."""

    rule: str
    """``pt2e:<quantizer class>``, the rule name annotations carry in dumps and reports."""
    nodes: dict[str, PlannedNode] = field(default_factory=dict)
