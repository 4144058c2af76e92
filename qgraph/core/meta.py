"""The keys under which qgraph keeps its records in ``node.meta`` and ``GraphModule.meta``.

A pass that leaves something on a node for a later pass, a mode switch or a tool writes it
under one of these keys, and the record's type is named beside the key. Each key has one
home: here, in core, so that core's own readers (the dumps) find a record without importing
the layer that defines its type.
"""

from __future__ import annotations

# --- node.meta --------------------------------------------------------------------------

ANNOTATION_KEY = "qgraph_annotation"
"""A node's :class:`~qgraph.quant.specs.QuantAnnotation`: the specs the backend's rule put on
its inputs and output (written by ``annotate``)."""
