"""Sync batch norm: batch norms in training form take their statistics from the global batch.

The graph analogue of ``nn.SyncBatchNorm.convert_sync_batchnorm``: every
``aten.batch_norm(..., training=True, ...)`` becomes ``qgraph::sync_batch_norm`` with the
same arguments (:mod:`qgraph.ops.sync_batch_norm` has the math), and every
``sync_batch_norm`` whose ``training`` is off, or all of them with ``enabled=False``, goes
back to ``aten.batch_norm``. Only the target changes: the node keeps its name, arguments,
users and meta, so the graph stays valid and its provenance untouched.

Why only training form: outside training the two ops are the same computation, and keeping
``aten.batch_norm`` there leaves ``convert`` and the exporters the graphs they know. The
mode switches (:mod:`qgraph.api.modes`) run this pass after every switch on a graph that
:func:`qgraph.sync_batch_norm` marked, because a QAT conv's simulated batch norm is rebuilt
as ``aten.batch_norm`` whenever it returns to its train form.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.graph import is_op
from qgraph.core.opsets import BATCH_NORM_OPS
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.ops.sync_batch_norm import SYNC_BATCH_NORM

aten = torch.ops.aten

TRAINING_ARG = 5
"""Index of ``training`` in ``batch_norm(input, weight, bias, mean, var, training, ...)``."""


def _training(node: torch.fx.Node) -> bool:
    return len(node.args) > TRAINING_ARG and node.args[TRAINING_ARG] is True


class SyncBatchNorm(Pass):
    """``aten.batch_norm`` in training form ↔ ``qgraph::sync_batch_norm`` (``enabled``)."""

    name = "sync_batch_norm"

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        changed = 0
        for node in gm.graph.nodes:
            if self.enabled and is_op(node, BATCH_NORM_OPS) and _training(node):
                node.target = SYNC_BATCH_NORM
                changed += 1
            elif is_op(node, {SYNC_BATCH_NORM}) and not (self.enabled and _training(node)):
                node.target = aten.batch_norm.default
                changed += 1
        return PassResult(gm, changed > 0)
