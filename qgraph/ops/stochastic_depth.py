"""``qgraph::stochastic_depth``: a residual branch dropped per sample, as one mode-aware op.

Why: ``torchvision.ops.stochastic_depth`` decides in Python whether it is training, so
``torch.export`` of a model in training mode records the random mask as plain ops::

    noise = empty([N, 1, 1, 1]).bernoulli_(1 - p).div_(1 - p)      # "row" mode
    out   = x * noise

which stay in the graph after ``.eval()`` — a QAT model would keep dropping residual
branches at inference. :class:`qgraph.passes.prepare.stochastic_depth.StochasticDepth` rewrites
that pattern into this op, whose signature mirrors ``aten.dropout(x, p, train)``, so the
mode switches (:mod:`qgraph.api.modes`) flip its ``train`` flag and ``convert`` removes it
like a dropout.

Math: with ``keep = 1 - p``, in training ``out = x * m / keep`` with
``m ~ Bernoulli(keep)`` of shape ``[N, 1, ..., 1]`` (``row=True``: one draw per sample) or
``[1, ..., 1]`` (one draw for the batch), so ``E[out] = x``; in eval ``out = x``.
The kernel is composite (plain ATen ops), so autograd needs nothing of its own.
"""

from __future__ import annotations

import torch

from qgraph.core.opsets import DROPOUT_OPS

_LIB = torch.library.Library("qgraph", "FRAGMENT")
_LIB.define("stochastic_depth(Tensor x, float p, bool train, bool row) -> Tensor")


def _stochastic_depth(x: torch.Tensor, p: float, train: bool, row: bool) -> torch.Tensor:
    if not train or p == 0.0:
        return x.clone()
    keep = 1.0 - p
    size = [x.shape[0]] + [1] * (x.dim() - 1) if row else [1] * x.dim()
    noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(keep)
    if keep > 0.0:
        noise = noise.div_(keep)
    return x * noise


_LIB.impl("stochastic_depth", _stochastic_depth, "CompositeImplicitAutograd")

STOCHASTIC_DEPTH = torch.ops.qgraph.stochastic_depth.default

EVAL_IDENTITY_OPS = DROPOUT_OPS | {STOCHASTIC_DEPTH}
"""Ops that are the identity in eval mode and take ``(x, p, train, ...)``: mode switches flip
``train``, ``convert`` removes them. Stochastic depth is a dropout of whole residual branches."""
