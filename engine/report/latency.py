"""CPU latency measurement: warm up, then the median of repeated timed runs.

``median_latency_ms(fn)`` calls the zero-argument ``fn`` a few times to warm
caches/allocators, then times up to ``runs`` calls and returns the median in
milliseconds. A time budget caps the total so a huge model cannot stall a job:
at least one timed run always happens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_latency_ms(
    fn: Callable[[], Any], *, warmup: int = 5, runs: int = 25, budget_s: float = 1.0
) -> float:
    deadline = time.perf_counter() + budget_s
    # Warm-up gets at most a quarter of the budget; one call always happens.
    warm_deadline = time.perf_counter() + budget_s / 4
    for _ in range(warmup):
        fn()
        if time.perf_counter() > warm_deadline:
            break
    times: list[float] = []
    while len(times) < runs:
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1e6)
        if time.perf_counter() > deadline:
            break
    return float(statistics.median(times))
