"""Timing helpers shared by the benchmarks: round-robin timing, machine load, paired ratios.

A speed claim here is always a ratio of two flows timed in the same run. Two flows that
run the same kernels differ by less than the machine's run-to-run noise (±3 % on this
VM), so a single pair of medians cannot say which is faster. ``interleaved_rounds``
therefore keeps one time per flow per round, and ``paired_ratio`` turns the rounds into
the median of the per-round ratios with a distribution-free confidence interval: a slow
drift of the machine hits both flows of a round alike and cancels in their ratio. Each
flow can be several loaded instances taking turns, so that where one load's weights
landed in memory does not pass for a difference between the models. Checked by timing a
file against itself, 8 loads a side: six runs (three ``.pte``, three ``.onnx``) all
gave ``tie``, medians 0.999-1.003.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any, Callable, Union


def _system_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux ``/proc/stat``)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def _own_busy_seconds() -> float:
    t = os.times()
    return t.user + t.system


class OtherLoad:
    """Context manager: how many cores *other* processes kept busy, on average, inside it.

    Timings are only comparable when this is near 0; ``None`` where it cannot be read.
    """

    def __enter__(self) -> "OtherLoad":
        self.cores: float | None = None
        self._start = (time.perf_counter(), _system_busy_seconds(), _own_busy_seconds())
        return self

    def __exit__(self, *exc: Any) -> None:
        wall0, system0, own0 = self._start
        system1 = _system_busy_seconds()
        if system0 is None or system1 is None:
            return
        others = (system1 - system0) - (_own_busy_seconds() - own0)
        self.cores = round(max(others, 0.0) / (time.perf_counter() - wall0), 2)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and its wall time in seconds."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


Instances = Union[Callable[[], Any], Sequence[Callable[[], Any]]]


def loaded(load: Callable[[], Callable[..., Any]], n: int, *args: Any) -> list[Callable[[], Any]]:
    """``n`` instances of a runtime, each from its own ``load()``, as calls on ``args``."""
    return [functools.partial(load(), *args) for _ in range(n)]


def interleaved_rounds(
    fns: dict[str, Instances], warmup: int, rounds: int, settle: int = 0, block: int = 1
) -> dict[str, list[float]]:
    """Per round, the median wall time (s) of each ``fns[name]()``, timed round-robin.

    After ``warmup`` untimed calls of each function, each of the ``rounds`` rounds gives
    every function ``settle`` untimed calls and then ``block`` timed ones in a row, and
    keeps their median. Settling lets a function find its own weights in cache (a
    deployed model runs back to back) and lets the runtime of the function before it go
    quiet: ONNX Runtime's worker threads keep spinning for a while after a run.

    A name may map to several instances of one model, each loaded on its own; round ``i``
    calls instance ``i mod n``. One loaded instance can stay about 1 % faster or slower
    than another loaded from the same file (where its weights landed in memory; measured:
    six ONNX Runtime sessions of one file, medians within 1.7 %; six ``.pte`` loads, one
    0.8 % slower than another, outside its 95 % interval), which no number of rounds of
    one instance averages away.
    """
    instances = {name: list(fn) if isinstance(fn, Sequence) else [fn] for name, fn in fns.items()}
    for copies in instances.values():
        for fn in copies:
            for _ in range(warmup):
                fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(rounds):
        for name, copies in instances.items():
            fn = copies[i % len(copies)]
            for _ in range(settle):
                fn()
            samples[name].append(statistics.median(timed(fn)[1] for _ in range(block)))
    return samples


def interleaved_medians(
    fns: dict[str, Instances], warmup: int, rounds: int, settle: int = 0, block: int = 1
) -> dict[str, float]:
    """Median over rounds of ``interleaved_rounds``: one time (s) per function."""
    return {name: statistics.median(s) for name, s in interleaved_rounds(fns, warmup, rounds, settle, block).items()}


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median of ``values`` (the sign test's order statistics).

    The number of values below the true median is Binomial(n, 1/2), so with ``k`` the
    largest count with ``P(B < k) <= (1 - confidence) / 2``, the k-th smallest and the
    k-th largest value bracket the median with probability at least ``confidence``. It
    assumes only that the values are independent draws of one distribution. Per-round
    ratios are that up to the loads taking turns (a mixture of a few loads' effects),
    which is why the benchmarks use 8 loads a side rather than 2.
    """
    n = len(values)
    tail = (1.0 - confidence) / 2.0
    k, below = 0, 0  # below = 2**n P(B < k + 1) as k grows, exact in integers
    while k < n:
        below += math.comb(n, k)
        if below / 2**n > tail:  # int / int: exact to a float even where 2.0**n overflows
            break
        k += 1
    if k == 0:
        raise ValueError(f"{n} values cannot bound a median at {confidence:.0%}; take at least 6 rounds")
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def paired_ratio(ours: list[float], theirs: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """Median of ``ours[i] / theirs[i]`` over rounds, its interval, and what the interval says.

    ``verdict`` is ``"faster"`` when the whole interval lies below 1, ``"slower"`` when it
    lies above 1, and ``"tie"`` when it contains 1: the two cannot be told apart at this
    confidence, in this run.
    """
    if len(ours) != len(theirs):
        raise ValueError(f"paired_ratio needs one time per round of each: got {len(ours)} and {len(theirs)}")
    ratios = [a / b for a, b in zip(ours, theirs)]
    low, high = median_interval(ratios, confidence)
    verdict = "faster" if high < 1.0 else "slower" if low > 1.0 else "tie"
    return {"median": round(statistics.median(ratios), 4), "interval": [round(low, 4), round(high, 4)],
            "confidence": confidence, "rounds": len(ratios), "verdict": verdict}  # fmt: skip
