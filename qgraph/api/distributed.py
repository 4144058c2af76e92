"""Training and calibrating a prepared model in several processes (DDP, FSDP2, sharded PTQ).

qgraph's rule (:mod:`qgraph.core.distributed`): a prepared model computes what one process
computes on the global batch, the concatenation of every rank's batch of the step.

* **Observers** need nothing: in a training step (QAT) or calibration (PTQ) each reduces its
  batch's min / max — or histogram — across ranks before updating, so every rank holds the
  same ranges at every step (:mod:`qgraph.observers.base`).
* **Batch norm** needs one call, :func:`sync_batch_norm`, before training, the graph analogue
  of ``nn.SyncBatchNorm.convert_sync_batchnorm`` (which finds no module to convert in an
  exported graph). Why global statistics rather than averaging or broadcasting the running
  statistics at the end: averaged statistics are those of no batch, rank 0's alone saw a
  fraction of the data, and either way a collective in ``freeze_bn_stats`` or ``convert``
  would hang the common ``if rank == 0: convert(...)``. With global statistics the ranks
  agree at every step, and ``convert`` needs no communication.
* **FSDP2** (``fully_shard`` on the prepared graph as one unit: its forward calls no
  submodule): :func:`qgraph.convert` gathers the full parameters itself (a collective: call
  it on every rank). FSDP2 discards what a forward writes into the parameters it gathered,
  so learnable ranges, which the first training batch initializes in place, must see that
  batch before ``fully_shard``. Under DDP, ``convert`` takes the wrapper or its ``.module``.

Every rank must run the same observing forwards — as it must under DDP. Work that only some
ranks do goes inside :func:`qgraph.core.distributed.rank_local`.
"""

from __future__ import annotations

import copy
import itertools
import sys
import warnings

import torch
import torch.fx
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qgraph.core.distributed import world_size
from qgraph.core.errors import ConfigError
from qgraph.core.graph import is_op
from qgraph.core.meta import PREPARED_KEY, SIMULATED_BN_KEY, SYNC_BN_KEY
from qgraph.ops.sync_batch_norm import ANY_BATCH_NORM_OPS
from qgraph.passes.prepare.sync_batch_norm import SyncBatchNorm


def sync_batch_norm(prepared: torch.fx.GraphModule, enabled: bool = True) -> torch.fx.GraphModule:
    """Make every batch norm of a QAT-prepared graph use the global batch's statistics in training.

    Call it once, on every rank, before wrapping the model in DDP (or ``fully_shard``); it
    returns ``prepared``, changed in place. In training mode a batch norm then normalizes
    with, and updates its running statistics from, the mean and variance of the global
    batch (:mod:`qgraph.ops.sync_batch_norm`), which is one gather per batch norm per step;
    in eval mode, in one process, or once :func:`qgraph.freeze_bn_stats` froze them, it is
    plain batch norm. ``enabled=False`` undoes it.
    """
    if isinstance(prepared, DistributedDataParallel):
        raise ConfigError("sync_batch_norm takes the prepared graph: call it before wrapping the model in DDP")
    meta = prepared.meta.get(PREPARED_KEY) if isinstance(prepared, torch.fx.GraphModule) else None
    if meta is None or not meta["qat"]:
        raise ConfigError(
            "sync_batch_norm takes the model returned by qgraph.prepare_qat "
            "(prepare_ptq folds batch norm into the convs: there are no statistics to synchronize)"
        )
    prepared.meta[SYNC_BN_KEY] = enabled
    if SyncBatchNorm(enabled).call(prepared).modified:
        prepared.graph.lint()
        prepared.recompile()
    return prepared


def gather_full_model(model: nn.Module) -> nn.Module:
    """The prepared graph behind ``model``, whole: what ``convert`` reads.

    A DDP wrapper gives its ``.module``. A graph that FSDP2 sharded gives a plain
    GraphModule copy in which every sharded parameter (a ``DTensor``) is the full tensor
    (``DTensor.full_tensor()``, a collective that every rank must join, in the same order:
    the order of ``parameters()`` and ``buffers()``); anything else is returned as it is.
    Warns when the graph trained batch norms across ranks without :func:`sync_batch_norm`.
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if not isinstance(model, torch.fx.GraphModule):
        return model
    _warn_unsynchronized_batch_norm(model)
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    tensors = itertools.chain(model.parameters(), model.buffers())
    sharded = [t for t in tensors if dtensor is not None and isinstance(t, dtensor)]
    if not sharded and not (fsdp_module is not None and isinstance(model, fsdp_module)):
        return model
    memo: dict[int, torch.Tensor] = {}
    for t in sharded:
        full = t.full_tensor().detach()
        memo[id(t)] = nn.Parameter(full, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else full
    # GraphModule's constructor builds a plain (not FSDP) module sharing model's submodules and
    # tensors; FSDP forbids deep-copying its own class. The deep copy then swaps in full tensors.
    shell = torch.fx.GraphModule(model, copy.deepcopy(model.graph))
    shell.meta = dict(model.meta)
    return copy.deepcopy(shell, memo)


def _loaded(module: str, name: str) -> type | None:
    """``module.name`` when ``module`` was imported, else None. A DTensor or an FSDP module
    exists only once its module is loaded, and importing FSDP takes seconds, which
    ``import qgraph`` should not pay."""
    return getattr(sys.modules.get(module), name, None)


def _warn_unsynchronized_batch_norm(gm: torch.fx.GraphModule) -> None:
    prepared = gm.meta.get(PREPARED_KEY)
    if world_size() == 1 or prepared is None or not prepared["qat"] or gm.meta.get(SYNC_BN_KEY):
        return
    if any(is_op(n, ANY_BATCH_NORM_OPS) or SIMULATED_BN_KEY in n.meta for n in gm.graph.nodes):
        warnings.warn(
            "converting a QAT graph with batch norms in a distributed run, but their statistics were not "
            "synchronized: under DDP each rank ends with its own last update, so ranks convert different "
            "models. Call qgraph.sync_batch_norm(prepared) before training.",
            stacklevel=4,
        )
