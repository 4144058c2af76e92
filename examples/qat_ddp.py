"""Quantization-aware training with DistributedDataParallel, on CPU, in two processes.

    torchrun --nproc-per-node 2 examples/qat_ddp.py [--epochs 5]

Each rank trains the digits CNN on its own shard of scikit-learn's digits (no download),
with one qgraph call beyond the usual DDP loop: ``qgraph.sync_batch_norm`` makes batch norm
use the statistics of the global batch, as ``nn.SyncBatchNorm`` does for eager models.
Observers need no call: in a training step they reduce each batch's range across ranks.
Every rank then converts, right after training, to the same int8 model; rank 0 checks that
and prints the test accuracy.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import qgraph
from qgraph.models.digits import DigitsCNN, load_digits_split


def same_on_every_rank(t: torch.Tensor) -> bool:
    """True when ``t`` equals rank 0's ``t`` bit for bit on every rank."""
    reference = t.clone()
    dist.broadcast(reference, src=0)
    agree = torch.tensor([int(torch.equal(reference, t))])
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    return bool(agree.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets the rank, world size and address
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights on every rank
    data = load_digits_split()
    train_set = TensorDataset(data.x_train, data.y_train)
    sampler = DistributedSampler(train_set, seed=0, drop_last=True)  # a different shard per rank
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    prepared = qgraph.prepare_qat(DigitsCNN().train(), (data.x_train[: args.batch_size],))
    qgraph.sync_batch_norm(prepared)  # the one qgraph call: BN statistics over all ranks
    model = DistributedDataParallel(prepared)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    qgraph.freeze_bn_stats(prepared)
    qgraph.freeze_observers(prepared)
    quantized = qgraph.convert(prepared)  # on every rank, no extra forward

    with torch.no_grad():
        logits = quantized(data.x_test)
    state = torch.cat([t.double().flatten() for t in quantized.state_dict().values()])
    agree = same_on_every_rank(state) and same_on_every_rank(logits)
    if rank == 0:
        accuracy = (logits.argmax(1) == data.y_test).float().mean().item()
        print(f"int8 test accuracy: {100 * accuracy:.1f}% after {args.epochs} epochs on {dist.get_world_size()} ranks")
        print(f"ranks agree: {agree}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
