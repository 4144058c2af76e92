"""The few collectives qgraph issues when it runs in several processes, and when it issues them.

qgraph's rule for data-parallel runs (DDP, FSDP2, sharded calibration): a prepared model
computes what one process would compute on the *global batch*, the concatenation of the
batches every rank sees in that step. Observers reduce each batch's min / max across ranks
(:mod:`qgraph.observers.base`), histogram observers sum their counts
(:mod:`qgraph.observers.histogram`), and :func:`qgraph.sync_batch_norm` makes batch norm
use the global batch's statistics (:mod:`qgraph.ops.sync_batch_norm`). Every rank then
holds the same ranges and statistics at every step, so ``convert`` gives the same model on
every rank without talking to the others.

Collectives run on the default process group, and only when it has more than one rank.
Each is a blocking call that every rank must make: a forward pass that observes (QAT in
training mode, PTQ calibration) must run on every rank, as under DDP. Work that only some
ranks do — evaluating a PTQ-prepared model on rank 0, a tool that calibrates internally —
runs inside :func:`rank_local`, where qgraph behaves as a single process.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.distributed as dist

_LOCAL = contextvars.ContextVar("qgraph_rank_local", default=False)


def world_size() -> int:
    """Ranks qgraph synchronizes with: the default group's size, 1 when there is none or
    inside :func:`rank_local`."""
    if _LOCAL.get() or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if world_size() > 1 else 0


@contextlib.contextmanager
def rank_local() -> Iterator[None]:
    """Inside this block qgraph issues no collective: observers keep this rank's own data
    and batch norm its own batch statistics (for work that not every rank does)."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def all_reduce_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min over ranks of lo, max over ranks of hi)``, elementwise, in one collective.

    ``max(hi) = -min(-hi)`` and negation is exact, so one ``MIN`` reduction of
    ``[lo, -hi]`` gives both. Returns the inputs when not distributed.
    """
    if world_size() == 1:
        return lo, hi
    both = torch.cat([lo.reshape(-1), -hi.reshape(-1)])
    dist.all_reduce(both, op=dist.ReduceOp.MIN)
    n = lo.numel()
    return both[:n].reshape(lo.shape), (-both[n:]).reshape(hi.shape)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (integer sums are exact); returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class _AllGather(torch.autograd.Function):
    """Stack every rank's ``x`` as ``[world, *x.shape]`` with gradients flowing back.

    Each rank writes its slot of a zero tensor and the slots are summed over ranks (an exact
    gather: ``0 + v = v``). The gradient of a sum over ranks is the sum over ranks of the
    gradient, taken at this rank's slot: rank ``r`` gets ``d(sum over ranks of the losses) /
    dx_r``, as ``torch.distributed.nn.functional`` defines it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank_: int, world: int) -> torch.Tensor:
        ctx.rank = rank_
        out = x.new_zeros((world, *x.shape))
        out[rank_] = x
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank], None, None


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """``[world, *x.shape]``: every rank's ``x`` in rank order, differentiable (see
    :class:`_AllGather`); ``x[None]`` when not distributed."""
    world = world_size()
    if world == 1:
        return x.unsqueeze(0)
    return _AllGather.apply(x, dist.get_rank(), world)
