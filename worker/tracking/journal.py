"""Where a job's tracking state and tracking events are written: the job row and its event log.

While the attempt owns the job every write is fenced by its lease token (:meth:`Attempt.write`); once the
attempt's own terminal transition has ended the job there is no lease left, so the closing writes go by job
id — only the attempt that ended the job ever makes them. After :meth:`close` nothing more is written: a
tracker thread that outlived its wait cannot overwrite the final state.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import update

from app.db.models import Job
from app.db.session import session_scope
from app.jobs import state
from app.jobs.events import append_event
from worker.attempt import Attempt, retrying

log = logging.getLogger("distillery.worker")
EVENT = "tracking"


class Journal:
    def __init__(self, attempt: Attempt):
        self.attempt, self.job_id = attempt, attempt.job_id
        self.ended = False  # set once the attempt's terminal transition committed
        self._lock = threading.Lock()
        self._closed = False

    def record(self, tracking: dict[str, Any] | None, message: str | None = None, *, level: str = "info",
               data: dict | None = None) -> None:
        """Store ``tracking`` (when given) and an event saying ``message`` (when given). Never raises: the
        tracking of a job must not end it."""
        with self._lock:
            if self._closed:
                return
            try:
                self._write(tracking, message, level, data)
            except Exception:  # noqa: BLE001 - the database stayed away past the retry budget
                log.exception("job %s: could not record its tracking state", self.job_id)

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _write(self, tracking: dict | None, message: str | None, level: str, data: dict | None) -> None:
        def add(s) -> None:
            if message is not None:
                append_event(s, self.job_id, EVENT, message, level=level, data=data)

        values = {"tracking": tracking} if tracking is not None else {}
        if not self.ended:
            self.attempt.write("recording tracking", add, **values)
            return

        def once() -> None:
            with session_scope() as s:
                if values:
                    s.execute(update(Job).where(Job.id == self.job_id, Job.status.in_(state.TERMINAL))
                              .values(**values).execution_options(synchronize_session=False))
                add(s)
        retrying(once, budget_seconds=self.attempt.db_retry_seconds, what="recording tracking")
