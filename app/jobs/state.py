"""The job state machine. Every status change goes through :func:`transition`.

    queued → running → succeeded | failed | cancelled
    running → cancelling → cancelled   (a cancel asked while it runs)
    queued → cancelled                 (cancelled before a worker took it)
    running | cancelling → queued      (lease expired: worker lost, retried)

The change is one conditional UPDATE (``WHERE status IN allowed_from``): if another process moved
the job first, no row changes and :class:`InvalidTransition` is raised. That makes duplicate
deliveries, racing cancels and reaper retries safe without locks.

**Fencing.** A worker's claim writes a fresh ``lease_token``; every later write of that attempt passes
``fence=token`` and so matches only while the attempt still owns the job. Once the reaper (or a release)
takes the job back, the token is cleared and a stale attempt can change nothing.

**Webhooks.** A change to ``queued``, ``running``, ``succeeded``, ``failed`` or ``cancelled`` also writes the
event's webhook deliveries (:func:`app.webhooks.outbox.job_changed`) in the same session: they commit with the
change or not at all.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.clock import utcnow
from app.db.models import Job
from app.webhooks.outbox import job_changed

QUEUED, RUNNING, CANCELLING = "queued", "running", "cancelling"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({QUEUED, RUNNING, CANCELLING})

ALLOWED_FROM: dict[str, frozenset[str]] = {
    RUNNING: frozenset({QUEUED}),
    CANCELLING: frozenset({RUNNING}),
    SUCCEEDED: frozenset({RUNNING}),
    FAILED: frozenset({QUEUED, RUNNING, CANCELLING}),
    CANCELLED: frozenset({QUEUED, RUNNING, CANCELLING}),
    QUEUED: frozenset({RUNNING, CANCELLING}),
}


class InvalidTransition(Exception):
    def __init__(self, job_id: str, to: str, allowed_from: frozenset[str]):
        super().__init__(f"job {job_id}: cannot move to {to!r} unless it is one of {sorted(allowed_from)}")
        self.job_id, self.to = job_id, to


def transition(session: Session, job_id: str, to: str, *, allowed_from: frozenset[str] | set[str] | None = None,
               now: datetime | None = None, fence: str | None = None, **values: Any) -> None:
    """Move ``job_id`` to status ``to`` if its current status allows it; set ``values`` in the same UPDATE.

    ``allowed_from`` may only narrow the table's rule; ``fence`` (an attempt's lease token) makes the
    change apply only while that attempt owns the job. Raises :class:`InvalidTransition` when no row
    changed (the job is elsewhere, or gone). Does not commit: the caller's unit of work does.
    """
    allowed = ALLOWED_FROM[to] if allowed_from is None else frozenset(allowed_from) & ALLOWED_FROM[to]
    now = now or utcnow()
    values = {"status": to, "updated_at": now, **values}
    if to == RUNNING:
        values.setdefault("started_at", now)
    if to in TERMINAL or to == QUEUED:
        values.setdefault("lease_expires_at", None)
        values.setdefault("lease_token", None)
    if to in TERMINAL:
        values.setdefault("finished_at", now)
    where = [Job.id == job_id, Job.status.in_(allowed)]
    if fence is not None:
        where.append(Job.lease_token == fence)
    result = session.execute(
        update(Job).where(*where).values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        raise InvalidTransition(job_id, to, allowed)
    job_changed(session, job_id, to, now)
