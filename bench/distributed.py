"""Benchmark what qgraph's collectives add to a DDP QAT step (two gloo ranks on 127.0.0.1).

Models: the digits CNN (``digits``, batch 32 per rank, 1x8x8) and torchvision models by
name (``--models digits resnet18``; images ``--resolution`` square, ``--batch`` per rank).
Each rank runs one thread; both train the same flows in the same order.

Flows, each its own prepared model in its own DDP wrapper, one SGD step per call:

* ``local``: inside ``qgraph.rank_local()`` — qgraph issues no collective, as before it
  synchronized anything (DDP's gradient all-reduce only). Ranks end up different.
* ``observers``: the default — every fake-quant call that observes all-reduces its
  batch's min / max (one small ``all_reduce`` per call node per step).
* ``observers+sync_bn``: and ``qgraph.sync_batch_norm`` — one gather per batch norm
  forward and one all-reduce of its gradient backward.

One JSON line per model and flow: ``step_ms`` (rank 0's median step), ``collectives``
(qgraph's per step), and ``vs_local``, the median of the per-round ratios to ``local`` with
its 95 % interval and verdict (``bench/timing.py``); ``other_cores`` says how many cores
other processes kept busy (numbers only mean something near 0).

    python bench/distributed.py [--models digits resnet18] [--rounds 30] > distributed.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import OtherLoad, interleaved_rounds, paired_ratio  # noqa: E402

import qgraph  # noqa: E402
from qgraph.models.digits import DigitsCNN  # noqa: E402
from qgraph.models.vision import build_torchvision  # noqa: E402
from qgraph.observers.base import FakeQuantize  # noqa: E402
from qgraph.ops.sync_batch_norm import SYNC_BATCH_NORM  # noqa: E402

FLOWS = ("local", "observers", "observers+sync_bn")


def build(name: str, resolution: int, batch: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if name == "digits":
        return DigitsCNN(), (32, 1, 8, 8)
    return build_torchvision(name), (batch, 3, resolution, resolution)


def make_step(name: str, flow: str, shape: tuple[int, ...], rank: int):
    """One training step of ``flow`` and qgraph's collectives per step."""
    torch.manual_seed(0)
    model, _ = build(name, shape[-1], shape[0])
    prepared = qgraph.prepare_qat(model.train(), (torch.randn(shape),))
    if flow == "observers+sync_bn":
        qgraph.sync_batch_norm(prepared)
    ddp = DistributedDataParallel(prepared)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)

    def step() -> None:
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def local_step() -> None:
        with qgraph.rank_local():
            step()

    # a quantizer shared by several points observes at each of them
    observers = sum(n.op == "call_module" and isinstance(prepared.get_submodule(n.target), FakeQuantize)
                    for n in prepared.graph.nodes)  # fmt: skip
    synced_bn = sum(n.target is SYNC_BATCH_NORM for n in prepared.graph.nodes)
    collectives = {"local": 0, "observers": observers, "observers+sync_bn": observers + 2 * synced_bn}[flow]
    return (local_step if flow == "local" else step), collectives


def rank_main(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    records = []
    for name in args.models:
        _, shape = build(name, args.resolution, args.batch)
        steps, collectives = {}, {}
        for flow in FLOWS:
            steps[flow], collectives[flow] = make_step(name, flow, shape, rank)
        with OtherLoad() as load:
            samples = interleaved_rounds(steps, warmup=args.warmup, rounds=args.rounds)
        for flow in FLOWS:
            record = {"kind": "ddp_qat_step", "model": name, "flow": flow, "world": 2,
                      "batch_per_rank": shape[0], "collectives": collectives[flow],
                      "step_ms": round(1000 * sorted(samples[flow])[len(samples[flow]) // 2], 3),
                      "other_cores": load.cores}  # fmt: skip
            if flow != "local":
                record["vs_local"] = paired_ratio(samples[flow], samples["local"])
            records.append(record)
    if rank == 0:
        Path(out).write_text(json.dumps(records))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "resnet18"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "records.json")
        mp.spawn(rank_main, args=(port, args, out), nprocs=2, join=True)
        for record in json.loads(Path(out).read_text()):
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
