"""Train / eval switches and the usual QAT schedule for exported graphs.

``torch.export`` graphs record the mode of dropout and batch norm as arguments
(``dropout(x, p, train)``, ``batch_norm(..., training, momentum, eps, ...)``) and refuse
``.train()`` / ``.eval()``. These functions rewrite just those flags — every node keeps its
own ``p``, ``momentum`` and ``eps``; attention, which records its dropout only as
``dropout_p``, gets 0 outside training and its captured value back in training — and
switch the observer / fake-quant submodules, so that a prepared model behaves like an
eager one. ``prepare_*`` also binds them to the
model's ``.train()`` and ``.eval()`` so a plain PyTorch loop works unchanged. QAT's
simulated conv+BN switches between its train and eval form here (see
:mod:`qgraph.passes.prepare.fuse_conv_bn_qat`).
"""

from __future__ import annotations

import types

import torch
import torch.fx
from torch import nn

from qgraph.core.graph import is_op
from qgraph.core.meta import BN_FROZEN_KEY, SYNC_BN_KEY, TRAIN_DROPOUT_KEY
from qgraph.core.opsets import ATTENTION_OPS
from qgraph.observers.base import QUANTIZER_TYPES
from qgraph.ops.stochastic_depth import EVAL_IDENTITY_OPS
from qgraph.ops.sync_batch_norm import ANY_BATCH_NORM_OPS
from qgraph.passes.prepare.simulated_bn import set_simulated_bn_form
from qgraph.passes.prepare.sync_batch_norm import SyncBatchNorm

_BN_TRAINING_ARG = 5
_DROPOUT_TRAIN_ARG = 2
_SDPA_DROPOUT_ARG = 4


def _set_arg(node: torch.fx.Node, index: int, value: bool) -> bool:
    if len(node.args) <= index or node.args[index] == value:
        return False
    args = list(node.args)
    args[index] = value
    node.args = tuple(args)
    return True


def _set_attention_dropout(node: torch.fx.Node, training: bool) -> bool:
    """Attention records its dropout as a probability (``dropout_p=0.1`` in a training capture),
    not as a train flag: keep the captured value in ``meta`` and use 0 outside training."""
    in_kwargs = "dropout_p" in node.kwargs
    if in_kwargs:
        current = node.kwargs["dropout_p"]
    else:
        current = node.args[_SDPA_DROPOUT_ARG] if len(node.args) > _SDPA_DROPOUT_ARG else 0.0
    p = node.meta.setdefault(TRAIN_DROPOUT_KEY, current)
    value = p if training else 0.0
    if current == value:
        return False
    if in_kwargs:
        node.kwargs = {**node.kwargs, "dropout_p": value}
        return True
    return _set_arg(node, _SDPA_DROPOUT_ARG, value)


def _set_mode(m: torch.fx.GraphModule, training: bool) -> torch.fx.GraphModule:
    bn_training = training and not m.meta.get(BN_FROZEN_KEY, False)
    changed = set_simulated_bn_form(m, training, bn_training)
    for node in m.graph.nodes:
        if is_op(node, EVAL_IDENTITY_OPS):
            changed |= _set_arg(node, _DROPOUT_TRAIN_ARG, training)
        elif is_op(node, ANY_BATCH_NORM_OPS):
            changed |= _set_arg(node, _BN_TRAINING_ARG, bn_training)
        elif is_op(node, ATTENTION_OPS):
            changed |= _set_attention_dropout(node, training)
    changed |= _sync_batch_norm_form(m)
    if changed:
        m.graph.lint()
        m.recompile()
    nn.Module.train(m, training)
    return m


def train_mode(m: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Dropout on, batch norm on batch statistics (unless frozen), observers observing."""
    return _set_mode(m, True)


def eval_mode(m: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Dropout off, batch norm on running statistics, fake-quant ranges fixed."""
    return _set_mode(m, False)


def freeze_observers(m: nn.Module) -> nn.Module:
    """Stop every observer / fake-quant range update; qparams stay where they are."""
    for sub in m.modules():
        if isinstance(sub, QUANTIZER_TYPES):
            sub.freeze()
    return m


def freeze_bn_stats(m: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Batch norm uses and keeps its running statistics from now on, even in train mode."""
    m.meta[BN_FROZEN_KEY] = True
    for node in m.graph.nodes:
        if is_op(node, ANY_BATCH_NORM_OPS):
            _set_arg(node, _BN_TRAINING_ARG, False)
    _sync_batch_norm_form(m)
    m.recompile()
    return m


def _sync_batch_norm_form(m: torch.fx.GraphModule) -> bool:
    """Keep :func:`qgraph.sync_batch_norm`'s choice across switches: batch norms in training
    form are synchronized on a marked graph (a simulated BN returns to its train form as
    ``aten.batch_norm``), and plain ``aten.batch_norm`` everywhere else."""
    return SyncBatchNorm(enabled=m.meta.get(SYNC_BN_KEY, False)).call(m).modified


def bind_mode_methods(m: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make ``m.train()`` / ``m.eval()`` call :func:`train_mode` / :func:`eval_mode`."""

    def train(self, mode: bool = True):
        return _set_mode(self, mode)

    def eval_(self):
        return _set_mode(self, False)

    object.__setattr__(m, "train", types.MethodType(train, m))
    object.__setattr__(m, "eval", types.MethodType(eval_, m))
    return m
