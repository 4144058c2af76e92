"""Apply PT2E annotations: write the plan of :mod:`~qgraph.passes.prepare.pt2e_annotate` onto the graph.

The PT2E quantizer annotated the graph as it was before conv + BN folding (QAT) or right
after it (PTQ). Folding replaces nodes: a QAT conv reads ``w * s`` instead of ``w`` and its
BN becomes the simulated-BN tail; a PTQ BN disappears into its conv. Each annotation is
moved to where its tensor now lives:

* a node that still exists keeps its own annotation;
* an input ``p`` of ``c`` that ``c`` no longer reads is ``c``'s input at the position ``p``
  had (``all_input_nodes`` order: the conv's weight slot now holds the folded weight);
* a node that was removed is what its users read at its position (a BN's output is the
  tail's last node, or the conv it was folded into).

Every annotation becomes a :class:`~qgraph.quant.specs.QuantAnnotation` whose ``rule`` is
``pt2e:<quantizer class>`` and whose ``anchor`` is the node itself. A conv or linear the
quantizer left alone gets the reason in ``node.meta['qgraph_refusals']`` for
:func:`qgraph.coverage`. This is an annotate pass: resolve_specs and insert_quantizers
follow it unchanged. Time is linear in the graph plus the plan.
"""

from __future__ import annotations

import torch.fx

from qgraph.core.errors import ConfigError
from qgraph.core.graph import is_op
from qgraph.core.meta import ANNOTATION_KEY, PT2E_PLAN_KEY, REFUSALS_KEY, Refusal, RefusalKind
from qgraph.core.opsets import CONV_OPS, LINEAR_OPS
from qgraph.core.pass_manager import PassResult
from qgraph.passes.prepare.annotate import Annotate
from qgraph.passes.prepare.pt2e_annotate import Pt2eAnnotate
from qgraph.passes.prepare.pt2e_plan import Pt2ePlan
from qgraph.quant.specs import AnySpec, DerivedSpec, Point, QuantAnnotation, SharedSpec


class ApplyPt2eAnnotations(Annotate):
    """Annotate from a PT2E quantizer's plan instead of a backend's rules.

    A subclass of :class:`Annotate` only so that passes requiring an annotate pass accept it;
    it shares no code with the rule matcher.
    """

    name = "apply_pt2e_annotations"
    requires = (Pt2eAnnotate,)

    def __init__(self) -> None:  # no backend, scheme or config: the plan holds every decision
        pass

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        plan: Pt2ePlan | None = gm.meta.pop(PT2E_PLAN_KEY, None)
        if plan is None:
            raise ConfigError("apply_pt2e_annotations found no PT2E plan: run pt2e_annotate before it")
        nodes = {n.name: n for n in gm.graph.nodes}
        finder = _Finder(plan, nodes)
        for name, planned in plan.nodes.items():
            if not planned.input_specs and planned.output is None:
                continue  # only recorded so that shared / derived points can be found
            node = finder.node(name)
            inputs = {finder.producer(p, name).name: finder.spec(s) for p, s in planned.input_specs.items()}
            old = node.meta.get(ANNOTATION_KEY)
            if old is not None:  # two annotated nodes folded into one (conv and its BN in PTQ)
                inputs = {**old.inputs, **inputs}
            output = finder.spec(planned.output) if planned.output is not None else getattr(old, "output", None)
            node.meta[ANNOTATION_KEY] = QuantAnnotation(plan.rule, node.name, inputs, output)
        for node in gm.graph.nodes:
            if is_op(node, CONV_OPS | LINEAR_OPS) and ANNOTATION_KEY not in node.meta:
                node.meta[REFUSALS_KEY] = [Refusal(plan.rule, "the PT2E quantizer did not annotate it", RefusalKind.NOT_ANNOTATED)]
        return PassResult(gm, modified=bool(plan.nodes))


class _Finder:
    """Finds, by name, where a node or edge the quantizer saw lives after folding."""

    def __init__(self, plan: Pt2ePlan, nodes: dict[str, torch.fx.Node]):
        self.plan, self.nodes = plan, nodes

    def node(self, name: str) -> torch.fx.Node:
        if name in self.nodes:
            return self.nodes[name]
        planned = self.plan.nodes.get(name)
        for user, position in planned.users if planned else ():
            if user in self.nodes and position < len(self.nodes[user].all_input_nodes):
                return self.nodes[user].all_input_nodes[position]
        raise ConfigError(
            f"the PT2E quantizer annotated '{name}', which conv + BN folding removed without a user that "
            "shows what replaced it; annotate the folded pattern's output instead"
        )

    def producer(self, producer: str, consumer: str) -> torch.fx.Node:
        node = self.node(consumer)
        inputs = node.all_input_nodes
        if producer in self.nodes and self.nodes[producer] in inputs:
            return self.nodes[producer]
        before = self.plan.nodes[consumer].inputs if consumer in self.plan.nodes else []
        if producer in before and before.index(producer) < len(inputs):
            return inputs[before.index(producer)]
        raise ConfigError(f"the PT2E quantizer annotated the edge '{producer}' -> '{consumer}', which folding removed")

    def point(self, point: Point) -> Point:
        if isinstance(point, str):
            return self.node(point).name
        producer, consumer = point
        return (self.producer(producer, consumer).name, self.node(consumer).name)

    def spec(self, spec: AnySpec) -> AnySpec:
        if isinstance(spec, SharedSpec):
            return SharedSpec(self.point(spec.point))
        if isinstance(spec, DerivedSpec):
            return DerivedSpec(points=tuple(self.point(p) for p in spec.points), dtype=spec.dtype)
        return spec
