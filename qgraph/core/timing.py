"""Wall-clock latency of a callable: the median of repeated calls after a warm-up.

The median (not the mean) because a 2-core CI machine or a laptop has outliers from other
processes; the warm-up calls let a runtime plan its kernels and fill its caches first.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_ms(fn: Callable, *args, repeat: int = 50, warmup: int = 3) -> float:
    """Median milliseconds of ``fn(*args)`` over ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
