"""Insert quantizers: one observer (PTQ) or fake-quant module (QAT) per group of points.

For each :class:`~qgraph.passes.prepare.resolve_specs.QuantGroup` one module is registered on the
GraphModule (``fq_<point>`` for QAT, ``obs_<point>`` for PTQ; which class follows the spec's
``observer`` and ``learnable``, see :mod:`qgraph.observers.factory`) and called at every point of
the group:

* an *output* point ``n``: ``q = module(n)`` right after ``n``, and every user of ``n``
  reads ``q`` instead;
* an *edge* ``(p, c)``: ``q = module(p)`` right before ``c``, and only ``c`` reads ``q``.

Edges are rewired before outputs, so an edge whose producer also has a quantized output
reads the quantized output (a requantization), never the raw float value. Derived edges
(int32 biases) get a :class:`~qgraph.observers.base.DerivedQuantizer` that reads the qparams
of the groups it derives from. A group with a dynamic spec gets a
:class:`~qgraph.observers.base.DynamicQuantizer` (``dyn_<point>``): nothing to observe, its
qparams are chosen per batch at run time.

Because the modules are called like any other submodule, the prepared GraphModule stays a
plain ``nn.Module`` that trains with any optimizer; the straight-through estimator lives in
:func:`qgraph.quant.qparams.fake_quantize`.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.graph import copy_provenance, free_attr_name
from qgraph.core.meta import DERIVED_KEY, GROUPS_KEY, QUANTIZER_KEY
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.observers.base import DerivedQuantizer, DynamicQuantizer
from qgraph.observers.factory import make_quantizer
from qgraph.passes.prepare.resolve_specs import ResolveSpecs


class InsertQuantizers(Pass):
    """Put observers (``is_qat=False``) or fake-quant modules (``is_qat=True``) on every group."""

    name = "insert_quantizers"
    requires = (ResolveSpecs,)

    def __init__(self, is_qat: bool):
        self.is_qat = is_qat

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        groups = gm.meta.get(GROUPS_KEY, [])
        nodes = {n.name: n for n in gm.graph.nodes}
        prefix = "fq" if self.is_qat else "obs"
        inserted = 0
        module_of: dict = {}
        outputs: list[tuple[str, str]] = []
        for group in groups:
            if group.spec.dynamic:
                module_name = free_attr_name(gm, f"dyn_{group.name}")
                gm.add_submodule(module_name, DynamicQuantizer(group.spec, fake_quant=self.is_qat, point=group.name))
            else:
                module_name = free_attr_name(gm, f"{prefix}_{group.name}")
                example = _value_at(nodes, group)
                gm.add_submodule(module_name, make_quantizer(group.spec, self.is_qat, group.name, example))
            module_of.update({p: gm.get_submodule(module_name) for p in group.members})
            for producer, consumer in group.edges:
                p, c = nodes[producer], nodes[consumer]
                with gm.graph.inserting_before(c):
                    q = self._call(gm, module_name, p, (producer, consumer), like=c)
                c.replace_input_with(p, q)
                inserted += 1
            outputs.extend((module_name, name) for name in group.outputs)
        # Outputs after the edges of *every* group: an edge quantizer reading a producer whose
        # output another group quantizes is rewired to read that quantized output.
        for module_name, name in outputs:
            n = nodes[name]
            with gm.graph.inserting_after(n):
                q = self._call(gm, module_name, n, name)
            n.replace_all_uses_with(q, delete_user_cb=lambda u, q=q: u is not q)
            inserted += 1
        for (producer, consumer), spec in gm.meta.get(DERIVED_KEY, []):
            module_name = free_attr_name(gm, f"{prefix}_{producer}__{consumer}")
            sources = [module_of[p] for p in spec.points]
            gm.add_submodule(module_name, DerivedQuantizer(spec, sources, self.is_qat, point=f"{producer}->{consumer}"))
            p, c = nodes[producer], nodes[consumer]
            with gm.graph.inserting_before(c):
                q = self._call(gm, module_name, p, (producer, consumer), like=c)
            c.replace_input_with(p, q)
            inserted += 1
        return PassResult(gm, inserted > 0)

    def _call(self, gm, module_name: str, source: torch.fx.Node, point, like: torch.fx.Node | None = None) -> torch.fx.Node:
        q = gm.graph.call_module(module_name, (source,))
        copy_provenance(q, like or source, self.name)
        q.meta["val"] = source.meta.get("val")
        q.meta[QUANTIZER_KEY] = point
        return q


def _value_at(nodes: dict, group) -> object:
    """The recorded value (a fake tensor) at the group's first point, for its shape."""
    name = group.outputs[0] if group.outputs else group.edges[0][0]
    return nodes[name].meta.get("val")

