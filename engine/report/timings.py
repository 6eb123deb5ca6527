"""Wall-clock seconds per job phase: the ``timings`` event and the report's ``timings``.

One :class:`JobTimings` is active while a job runs (a context variable, so helpers deep in the
pipeline - latency measurement, export verification, the teacher cache - attribute their time
with :func:`phase` without being handed the timer; outside a job :func:`phase` does nothing).

Phases nest exclusively: seconds spent in an inner phase are not counted in the outer one, so the
main thread's phases add up to ``total`` (the job's wall time) less a few milliseconds of glue.
Work done on a background thread (plots, card, file hashes and gzip sizes; see
:mod:`engine.report.background`) is recorded under its own phase with its own duration and is
*not* on that sum; ``background_wait`` is the time the job waited for it at the end.

Phases (seconds, float): ``validate``, ``load``, ``teacher_scoring`` (held-out teacher outputs),
``student`` (build and check), ``cache`` (teacher outputs of the training rows), ``train``,
``evaluate``, ``measure`` (counts, serialization, gzip), ``latency``, ``export``, ``verify``
(reloading exports, comparing them, their held-out metrics), ``baseline``, ``report``, ``plots``,
``card``, ``hashes``, ``background_wait``, ``total``; only the phases a job ran appear.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_ACTIVE: ContextVar[JobTimings | None] = ContextVar("distillery_job_timings", default=None)


class JobTimings:
    """Accumulates seconds per phase for one job; :meth:`finish` adds ``total`` since creation."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._stack: list[list[Any]] = []  # per open phase: [name, start, seconds spent in inner phases]
        self._lock = threading.Lock()
        self._final: dict[str, float] | None = None

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` under ``name`` (thread-safe; for work timed on another thread)."""
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block under ``name``, less any inner phase's time (main thread only)."""
        start = time.perf_counter()
        self._stack.append([name, start, 0.0])
        try:
            yield
        finally:
            inner = self._stack.pop()[2]
            elapsed = time.perf_counter() - start
            self.add(name, elapsed - inner)
            if self._stack:
                self._stack[-1][2] += elapsed

    def finish(self) -> dict[str, float]:
        """``{phase: seconds}`` rounded to 0.1 ms, with ``total`` = seconds since the job started.

        The first call fixes the numbers (report.json is written with them; the ``timings`` event
        repeats them); later calls return the same dict. Phases still open count up to now."""
        now = time.perf_counter()
        with self._lock:
            if self._final is None:
                seconds = dict(self.seconds)
                child = 0.0
                for name, start, inner in reversed(self._stack):  # innermost first
                    seconds[name] = seconds.get(name, 0.0) + (now - start) - inner - child
                    child = now - start
                self._final = {k: round(v, 4) for k, v in seconds.items()}
                self._final["total"] = round(now - self.started, 4)
            return dict(self._final)


def describe_timings(seconds: dict[str, float], top: int = 5) -> str:
    """``"train 1.20s, export 0.31s, ..."``: the largest phases (an event message)."""
    parts = sorted(((v, k) for k, v in seconds.items() if k != "total"), reverse=True)[:top]
    return ", ".join(f"{k} {v:.2f}s" for v, k in parts)


def current() -> JobTimings | None:
    """The running job's timings (None outside a job)."""
    return _ACTIVE.get()


@contextmanager
def activate(timings: JobTimings) -> Iterator[JobTimings]:
    """Make ``timings`` the active job's for the block."""
    token = _ACTIVE.set(timings)
    try:
        yield timings
    finally:
        _ACTIVE.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """``with phase("export"):`` times the block in the active job's timings (a no-op outside a job)."""
    timings = _ACTIVE.get()
    if timings is None:
        yield
        return
    with timings.phase(name):
        yield
