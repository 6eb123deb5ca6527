"""One attempt at a job, as the worker holds it: its lease token, its heartbeat, and fenced writes.

The claim (``queued → running``) writes a fresh random ``lease_token``. From then on every database write of
the attempt — heartbeat, progress, events, metrics, artifact rows, the terminal transition — is conditional
on that token (:meth:`Attempt.guard`), so once the reaper has taken the job back (or another attempt claimed
it) a stale attempt changes nothing: its next write finds the token gone, marks the attempt :attr:`lost`,
and the supervisor kills its executor.

The :class:`Heartbeat` thread renews the lease every ``lease / 3`` seconds for as long as the attempt lives —
through staging, data loading, training, export, verification and storing the results — so a healthy job is
never requeued because one phase outlasted the lease. Database errors are retried with bounded backoff
(:func:`retrying`): a short outage pauses the attempt instead of failing it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

from sqlalchemy import update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from app.clock import utcnow
from app.db.models import Job
from app.db.session import session_scope
from app.jobs.state import CANCELLING, RUNNING

log = logging.getLogger("distillery.worker")
T = TypeVar("T")

#: Database errors worth waiting out (connection refused/reset, a restarting server, an exhausted pool).
TRANSIENT = (OperationalError, PoolTimeout)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def retrying(fn: Callable[[], T], *, budget_seconds: float, what: str, stop: threading.Event | None = None) -> T:
    """Call ``fn`` until it succeeds, retrying transient database errors with backoff (0.2 s doubling to 2 s)
    for at most ``budget_seconds``; then (or on any other error, or once ``stop`` is set) raise."""
    deadline = time.monotonic() + budget_seconds
    delay, warned = 0.2, False
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline or (stop is not None and stop.is_set()):
                raise
            if not warned:
                log.warning("database unavailable while %s (%s); retrying for up to %.0f s", what,
                            exc.__class__.__name__, budget_seconds)
                warned = True
            time.sleep(delay)  # backoff between retries, not synchronisation
            delay = min(delay * 2, 2.0)


def new_token() -> str:
    return secrets.token_hex(16)


@dataclass
class Attempt:
    """The claimed attempt ``number`` of ``job_id`` owned through ``token``."""

    job_id: str
    token: str
    number: int
    worker_id: str
    lease_seconds: int
    db_retry_seconds: float = 120.0
    lost: threading.Event = field(default_factory=threading.Event)
    #: Set once the attempt starts its own ending (terminal transition or release).
    finishing: threading.Event = field(default_factory=threading.Event)

    def lease_values(self) -> dict:
        now = utcnow()
        return {"heartbeat_at": now, "lease_expires_at": now + timedelta(seconds=self.lease_seconds)}

    def guard(self, session: Session, **values) -> bool:
        """In ``session``'s transaction: renew the lease (plus ``values``) iff this attempt still owns the job.

        The UPDATE's row lock is held until the caller commits, so whatever the caller writes next in the same
        transaction lands before any requeue or not at all. False (and :attr:`lost` set) when fenced out."""
        if self.lost.is_set():
            return False
        res = session.execute(update(Job).where(Job.id == self.job_id, Job.lease_token == self.token,
                                                Job.status.in_((RUNNING, CANCELLING)))
                              .values(**self.lease_values(), **values).execution_options(synchronize_session=False))
        if res.rowcount != 1:
            self.fence_out()
            return False
        return True

    def fence_out(self) -> None:
        """This attempt no longer owns the job: it stops and writes nothing more (logged once). Silent when the
        attempt itself is ending the job, where a last heartbeat may race its own terminal transition."""
        if not self.lost.is_set() and not self.finishing.is_set():
            log.warning("job %s: attempt %d no longer owns the job (requeued or ended elsewhere); it stops "
                        "and writes nothing more", self.job_id, self.number)
        self.lost.set()

    def write(self, what: str, fn: Callable[[Session], None], **values) -> bool:
        """Run ``fn(session)`` in one fenced transaction (retried through short outages). False if fenced out."""
        def once() -> bool:
            with session_scope() as s:
                if not self.guard(s, **values):
                    return False
                fn(s)
                return True
        return retrying(once, budget_seconds=self.db_retry_seconds, what=what, stop=self.lost)


class Heartbeat:
    """Renews ``attempt``'s lease every ``lease / 3`` seconds from a daemon thread until :meth:`stop`."""

    def __init__(self, attempt: Attempt, interval: float | None = None):
        self.attempt = attempt
        self.interval = interval if interval is not None else max(attempt.lease_seconds / 3.0, 0.2)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{attempt.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def beat(self) -> bool:
        with session_scope() as s:
            return self.attempt.guard(s)

    def _run(self) -> None:
        wait = self.interval
        while not self._done.wait(wait):
            try:
                if not self.beat():
                    return  # fenced out: the supervisor sees attempt.lost and stops the executor
                wait = self.interval
            except Exception as exc:  # the database may be away: try again soon, the lease has slack
                log.warning("job %s: heartbeat failed (%s); retrying", self.attempt.job_id, exc.__class__.__name__)
                wait = min(self.interval, 1.0)
