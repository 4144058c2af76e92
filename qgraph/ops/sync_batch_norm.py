"""``qgraph::sync_batch_norm``: batch norm whose training statistics are the global batch's.

``nn.SyncBatchNorm`` is a module, so ``convert_sync_batchnorm`` finds nothing to convert in
an exported graph, where batch norm is an ``aten.batch_norm`` call. This op takes exactly
``aten.batch_norm``'s arguments, so :class:`qgraph.passes.prepare.sync_batch_norm.SyncBatchNorm`
swaps the target of a node and nothing else; the mode switches flip its ``training`` flag
like any batch norm's. Outside training, or in a single process
(:func:`qgraph.core.distributed.world_size` is 1), it *is* ``aten.batch_norm``.

Math. The global batch is the concatenation of every rank's batch. For channel ``c`` rank
``r`` holds ``n_r`` values with mean ``m_r`` and ``M2_r = Σ (x - m_r)²``; one gather of
``(m_r, M2_r, n_r)`` gives every rank the same statistics (Chan, Golub, LeVeque's
pairwise combination, in float64 on the small gathered tensor)::

    N   = Σ n_r          mean = Σ n_r m_r / N          M2 = Σ [M2_r + n_r (m_r - mean)²]
    y   = (x - mean) / sqrt(M2 / N + eps) · γ + β
    running_mean ← (1 - momentum) · running_mean + momentum · mean
    running_var  ← (1 - momentum) · running_var  + momentum · M2 / (N - 1)

which is what ``aten.batch_norm`` computes on the global batch, up to the order of float
summation. The gather is differentiable (its backward sums the gradient over ranks), so
rank ``r`` receives the gradient of the sum of every rank's loss with respect to its own
inputs; DDP's averaging of parameter gradients then gives the gradient of the mean loss
over the global batch — the semantics of ``nn.SyncBatchNorm``. torch's own autograd
function for it (``torch.nn.modules._functions.SyncBatchNorm``) needs
``aten.batch_norm_stats``, which has no CPU kernel, hence this composite of plain ops.
"""

from __future__ import annotations

import torch

from qgraph.core.distributed import all_gather, world_size
from qgraph.core.errors import ConfigError
from qgraph.core.opsets import BATCH_NORM_OPS

aten = torch.ops.aten

_LIB = torch.library.Library("qgraph", "FRAGMENT")
_LIB.define(
    "sync_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
    "bool training, float momentum, float eps, bool cudnn_enabled) -> Tensor"
)


def _sync_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled):
    if not training or world_size() == 1:
        return aten.batch_norm.default(
            input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled
        )
    channels = input.shape[1]
    count = input.numel() // channels
    if count:
        var, mean = torch.var_mean(input, [0, *range(2, input.dim())], correction=0)
        m2 = var * count
    else:  # an empty batch on this rank still takes part in the gather
        mean = m2 = input.new_zeros(channels)
    local = torch.cat([mean, m2, mean.new_full((1,), count)]).double()
    gathered = all_gather(local)
    means, m2s, counts = gathered[:, :channels], gathered[:, channels:-1], gathered[:, -1:]
    total = counts.sum()
    if total <= 1:
        raise ConfigError(
            f"sync_batch_norm got {int(total)} value per channel over all ranks in training; "
            "batch norm needs more than one: use a larger batch"
        )
    global_mean = (counts * means).sum(0) / total
    global_m2 = (m2s + counts * (means - global_mean).square()).sum(0)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            new_mean = momentum * global_mean + (1 - momentum) * running_mean.double()
            new_var = momentum * global_m2 / (total - 1) + (1 - momentum) * running_var.double()
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    shape = [1, channels] + [1] * (input.dim() - 2)
    invstd = torch.rsqrt(global_m2 / total + eps).to(input.dtype)
    out = (input - global_mean.to(input.dtype).reshape(shape)) * invstd.reshape(shape)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


_LIB.impl("sync_batch_norm", _sync_batch_norm, "CompositeImplicitAutograd")

SYNC_BATCH_NORM = torch.ops.qgraph.sync_batch_norm.default

ANY_BATCH_NORM_OPS = BATCH_NORM_OPS | {SYNC_BATCH_NORM}
"""Ops with ``aten.batch_norm``'s arguments: mode switches flip their ``training`` flag."""
