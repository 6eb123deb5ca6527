"""The engine's Reporter, implemented against the database, every write fenced by the attempt's lease token.

Each call is its own short transaction so progress is visible to clients at once; each renews the lease
too (the :class:`~worker.attempt.Heartbeat` thread does so between calls). A write of an attempt that no
longer owns the job is dropped, and :meth:`should_stop` then says stop. ``should_stop`` is polled by the
supervisor's watch thread; it reads the job at most every ``poll_seconds``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from app.db.models import Job
from app.db.session import session_scope
from app.jobs.events import append_event, append_metric
from app.jobs.state import RUNNING
from worker.attempt import Attempt

log = logging.getLogger("distillery.worker")


class DbReporter:
    """``on_metric``: also told each metric point once it is stored (the job's experiment tracker)."""

    def __init__(self, attempt: Attempt, poll_seconds: float = 0.5, on_metric: Callable[..., None] | None = None):
        self.attempt, self.job_id, self.poll_seconds = attempt, attempt.job_id, poll_seconds
        self.on_metric = on_metric
        self._last_poll = 0.0
        self._stop = False

    def event(self, type: str, message: str, *, level: str = "info", data: dict | None = None) -> None:
        self.attempt.write("recording an event", lambda s: append_event(s, self.job_id, type, message, level=level,
                                                                        data=_jsonable(data)))

    def progress(self, progress: dict) -> None:
        self.attempt.write("recording progress", lambda s: None, progress=_jsonable(progress))

    def metric(self, *, step: int, epoch: int, name: str, value: float) -> None:
        stored = self.attempt.write("recording a metric", lambda s: append_metric(s, self.job_id, step=step,
                                                                                  epoch=epoch, name=name, value=value))
        if stored and self.on_metric is not None:
            self.on_metric(step=step, epoch=epoch, name=name, value=value)

    def should_stop(self) -> bool:
        """True once the job was cancelled or this attempt lost it (fenced out)."""
        if self.attempt.lost.is_set():
            self._stop = True
        now = time.monotonic()
        if self._stop or now - self._last_poll < self.poll_seconds:
            return self._stop
        self._last_poll = now
        with session_scope() as s:
            row = s.execute(select(Job.status, Job.lease_token).where(Job.id == self.job_id)).first()
        if row is None or row.lease_token != self.attempt.token:
            self.attempt.fence_out()
        self._stop = row is None or row.status != RUNNING or self.attempt.lost.is_set()
        return self._stop


def _jsonable(value: Any) -> Any:
    """Engine values may be numpy scalars; the JSON column wants plain Python."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
