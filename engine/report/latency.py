"""CPU latency measurement: warm up, then the median of repeated timed runs.

``median_latency_ms(fn)`` calls the zero-argument ``fn`` a few times to warm
caches/allocators, then times up to ``runs`` calls and returns the median in
milliseconds. A time budget caps the total so a huge model cannot stall a job:
at least one timed run always happens; with ``stable_within`` the runs stop as
soon as the median no longer moves.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_latency_ms(
    fn: Callable[[], Any], *, warmup: int = 5, runs: int = 25, budget_s: float = 1.0,
    stable_within: float | None = None, min_runs: int = 7,
) -> float:
    """``stable_within`` (e.g. 0.02): stop after ``min_runs`` once the median of all runs and the median
    without the last ``STABLE_LOOKBACK`` runs are within that fraction of each other - a model whose
    runs are steady is not timed 25 times over (the job's whole cost stays proportional to the model's)."""
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
        if time.perf_counter() > deadline or (stable_within is not None and _stable(times, min_runs, stable_within)):
            break
    return float(statistics.median(times))


#: Runs the stability check leaves out to see whether they moved the median.
STABLE_LOOKBACK = 4


def _stable(times: list[float], min_runs: int, within: float) -> bool:
    if len(times) < max(min_runs, STABLE_LOOKBACK + 3):
        return False
    now, before = statistics.median(times), statistics.median(times[:-STABLE_LOOKBACK])
    return abs(now - before) <= within * now
