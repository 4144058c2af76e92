"""Benchmark PTQ calibration: histogram observers against min-max observers and fp32 inference.

Model: torchvision ``mobilenet_v2`` (random init, ``num_classes=10``), by default at
224x224 in batches of 16 (``--models``, ``--resolution``, ``--batch`` change that). Torch
runs with ``--threads`` threads (2).

One JSON line per model and flow (``"kind": "calibration"``):

* ``fp32``: the eager model's forward in eval mode under ``torch.no_grad()``;
* ``minmax``: ``qgraph.calibrate`` of ``prepare_ptq(model)`` (the backend's min-max observers);
* ``histogram``: the same with ``qgraph.histogram_ptq()`` (histogram observers on every
  activation; the range method does not change calibration, only convert).

``images_per_s`` is the batch size over the median time of one batch; ``vs_fp32`` is the
flow's throughput divided by fp32's (the issue asks ≥ 0.5 for ``histogram``). The three
flows are timed round-robin (``--warmup`` then ``--reps`` rounds, median), so a change in
machine load hits all alike; ``other_cores`` says how many cores other processes kept busy
meanwhile (from ``/proc/stat``; absolute numbers only mean something near 0).

Then one line per range method (``"kind": "convert"``): ``convert_s``, the wall time of
``qgraph.convert`` of the calibrated histogram model, and ``select_s``, the part of it spent
choosing ranges (``HistogramObserver.chosen_range`` for all ``observers``).

    python bench/calibration.py [--models mobilenet_v2] [--resolution 224] [--batch 16] > calibration.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline import emit, log  # noqa: E402  (shared output helpers)
from timing import OtherLoad, interleaved_medians  # noqa: E402

import qgraph  # noqa: E402
from qgraph.models.vision import build_torchvision  # noqa: E402
from qgraph.observers.histogram import HistogramObserver  # noqa: E402
from qgraph.recipes.presets import histogram_ptq  # noqa: E402


def bench_model(name: str, resolution: int, batch: int, warmup: int, reps: int) -> None:
    model = build_torchvision(name).eval()
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    log(f"{name}: prepare")
    captured = qgraph.capture(model, (x,))
    minmax = qgraph.prepare_ptq(captured, None)
    hist = qgraph.prepare_ptq(captured, None, config=histogram_ptq())
    observers = [m for m in hist.modules() if isinstance(m, HistogramObserver)]

    def fp32() -> None:
        with torch.no_grad():
            model(x)

    flows = {
        "fp32": fp32,
        "minmax": lambda: qgraph.calibrate(minmax, [x], progress=False),
        "histogram": lambda: qgraph.calibrate(hist, [x], progress=False),
    }
    log(f"{name}: timing {list(flows)}")
    with OtherLoad() as load:
        seconds = interleaved_medians(flows, warmup, reps)
    base = batch / seconds["fp32"]
    for flow, s in seconds.items():
        emit({"kind": "calibration", "model": name, "flow": flow, "resolution": resolution, "batch": batch,
              "threads": torch.get_num_threads(), "batch_s": round(s, 4), "images_per_s": round(batch / s, 2),
              "vs_fp32": round(batch / s / base, 3), "observers": len(observers) if flow == "histogram" else None,
              "other_cores": load.cores})  # fmt: skip

    for method in ("mse", "entropy", "percentile"):
        for obs in observers:
            obs.spec = obs.spec.with_(range_method=method)  # same histogram, another method
        t = time.perf_counter()
        for obs in observers:
            obs.chosen_range()
        select_s = time.perf_counter() - t
        for obs in observers:
            obs._cache = None  # convert computes them again, as it would after calibrate
        t = time.perf_counter()
        qgraph.convert(hist)
        emit({"kind": "convert", "model": name, "range_method": method, "observers": len(observers),
              "convert_s": round(time.perf_counter() - t, 2), "select_s": round(select_s, 2)})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        bench_model(name, args.resolution, args.batch, args.warmup, args.reps)


if __name__ == "__main__":
    main()
