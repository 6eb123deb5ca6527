"""Reconcile jobs with reality: the SQL database is the truth, a worker may vanish.

A running job whose lease expired lost its worker: it goes back to ``queued`` with a fresh dispatch (the
outbox) until ``max_attempts``, then ``failed`` with ``worker_lost``. A ``cancelling`` one ends
``cancelled``. Clearing the lease token fences the lost attempt out: if it was only slow, not dead, none of
its later writes match. Lost *messages* of queued jobs are the dispatcher's business
(:mod:`worker.dispatcher`).
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Job
from app.jobs import state
from app.jobs.events import append_event
from app.queue import dispatch

log = logging.getLogger("distillery.reaper")


def reap(session: Session, now: datetime) -> dict[str, int]:
    """One reconciliation pass over expired leases. Does not commit (the caller's unit of work does)."""
    counts = {"requeued": 0, "failed": 0, "cancelled": 0}
    # SKIP LOCKED: a row another session holds mid-write (its heartbeat, or a process stopped inside a
    # transaction, see app.db.session.end_idle_transactions) waits for the next pass instead of blocking the
    # requeue of every other expired job behind it. (SQLite ignores the clause; it locks the whole file.)
    expired = session.scalars(select(Job).where(Job.status.in_((state.RUNNING, state.CANCELLING)),
                                                Job.lease_expires_at < now)
                              .with_for_update(skip_locked=True)).all()
    for job in expired:
        # Each transition is fenced by the token we just read: a heartbeat that lands first wins.
        fence = job.lease_token
        try:
            if job.status == state.CANCELLING:
                state.transition(session, job.id, state.CANCELLED, allowed_from={state.CANCELLING}, now=now,
                                 fence=fence, error_code="cancelled", error_message="cancelled by the client")
                counts["cancelled"] += 1
            elif job.attempts < job.max_attempts:
                state.transition(session, job.id, state.QUEUED, allowed_from={state.RUNNING}, now=now, fence=fence,
                                 worker_id=None)
                append_event(session, job.id, "requeued", f"worker lost during attempt {job.attempts}; retrying",
                             level="warning")
                dispatch(session, job.id, job.queue, reason="requeued")
                counts["requeued"] += 1
            else:
                state.transition(session, job.id, state.FAILED, allowed_from={state.RUNNING}, now=now, fence=fence,
                                 error_code="worker_lost",
                                 error_message=f"the worker stopped responding in each of {job.attempts} attempts")
                counts["failed"] += 1
        except state.InvalidTransition:
            continue  # it moved on its own meanwhile
    if any(counts.values()):
        log.info("reaper: %s", counts)
    return counts
