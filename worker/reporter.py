"""The engine's Reporter, implemented against the database. Also renews the job's lease (heartbeat).

Each call is its own short transaction so progress is visible to clients at once. ``should_stop``
is called every training step, so it reads the job's status at most every ``poll_seconds``.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from app.clock import utcnow
from app.db.models import Job
from app.db.session import session_scope
from app.jobs.events import append_event, append_metric
from app.jobs.state import CANCELLING, RUNNING

log = logging.getLogger("distillery.worker")


class DbReporter:
    def __init__(self, job_id: str, lease_seconds: int, poll_seconds: float = 0.5):
        self.job_id, self.lease_seconds, self.poll_seconds = job_id, lease_seconds, poll_seconds
        self._last_poll = 0.0
        self._stop = False

    def event(self, type: str, message: str, *, level: str = "info", data: dict | None = None) -> None:
        with session_scope() as s:
            append_event(s, self.job_id, type, message, level=level, data=_jsonable(data))

    def progress(self, progress: dict) -> None:
        with session_scope() as s:
            s.execute(update(Job).where(Job.id == self.job_id, Job.status.in_((RUNNING, CANCELLING)))
                      .values(progress=_jsonable(progress), **self._lease()))

    def metric(self, *, step: int, epoch: int, name: str, value: float) -> None:
        with session_scope() as s:
            append_metric(s, self.job_id, step=step, epoch=epoch, name=name, value=value)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if self._stop or now - self._last_poll < self.poll_seconds:
            return self._stop
        self._last_poll = now
        with session_scope() as s:
            status = s.scalar(select(Job.status).where(Job.id == self.job_id))
            # Heartbeat while we are here: a live worker keeps its lease.
            s.execute(update(Job).where(Job.id == self.job_id, Job.status == RUNNING).values(**self._lease()))
        self._stop = status != RUNNING
        return self._stop

    def _lease(self) -> dict[str, Any]:
        now = utcnow()
        return {"heartbeat_at": now, "lease_expires_at": now + timedelta(seconds=self.lease_seconds)}


def _jsonable(value: Any) -> Any:
    """Engine values may be numpy scalars; the JSON column wants plain Python."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
