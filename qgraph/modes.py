"""Train / eval switches and the usual QAT schedule for exported graphs.

``torch.export`` graphs record the mode of dropout and batch norm as arguments
(``dropout(x, p, train)``, ``batch_norm(..., training, momentum, eps, ...)``) and refuse
``.train()`` / ``.eval()``. These functions rewrite just those flags — every node keeps its
own ``p``, ``momentum`` and ``eps`` — and switch the observer / fake-quant submodules, so
that a prepared model behaves like an eager one. ``prepare_*`` also binds them to the
model's ``.train()`` and ``.eval()`` so a plain PyTorch loop works unchanged. QAT's
simulated conv+BN switches between its train and eval form here (see
:mod:`qgraph.passes.fuse_conv_bn_qat`).
"""

from __future__ import annotations

import types

import torch
import torch.fx
from torch import nn

from qgraph.batch_norm import BN_FROZEN_KEY
from qgraph.graph import BATCH_NORM_OPS, DROPOUT_OPS, is_op
from qgraph.observers import QUANTIZER_TYPES
from qgraph.passes.fuse_conv_bn_qat import set_simulated_bn_form

_BN_TRAINING_ARG = 5
_DROPOUT_TRAIN_ARG = 2


def _set_arg(node: torch.fx.Node, index: int, value: bool) -> bool:
    if len(node.args) <= index or node.args[index] == value:
        return False
    args = list(node.args)
    args[index] = value
    node.args = tuple(args)
    return True


def _set_mode(m: torch.fx.GraphModule, training: bool) -> torch.fx.GraphModule:
    bn_training = training and not m.meta.get(BN_FROZEN_KEY, False)
    changed = set_simulated_bn_form(m, training, bn_training)
    for node in m.graph.nodes:
        if is_op(node, DROPOUT_OPS):
            changed |= _set_arg(node, _DROPOUT_TRAIN_ARG, training)
        elif is_op(node, BATCH_NORM_OPS):
            changed |= _set_arg(node, _BN_TRAINING_ARG, bn_training)
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
        if is_op(node, BATCH_NORM_OPS):
            _set_arg(node, _BN_TRAINING_ARG, False)
    m.recompile()
    return m


def bind_mode_methods(m: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make ``m.train()`` / ``m.eval()`` call :func:`train_mode` / :func:`eval_mode`."""

    def train(self, mode: bool = True):
        return _set_mode(self, mode)

    def eval_(self):
        return _set_mode(self, False)

    object.__setattr__(m, "train", types.MethodType(train, m))
    object.__setattr__(m, "eval", types.MethodType(eval_, m))
    return m
