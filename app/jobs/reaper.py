"""Reconcile jobs with reality: the SQL database is the truth, the broker may lose messages.

- A running job whose lease expired lost its worker: it goes back to ``queued`` (and is re-sent)
  until ``max_attempts``, then ``failed`` with ``worker_lost``. A ``cancelling`` one ends ``cancelled``.
- A ``queued`` job untouched for ``resend_after`` seconds may have lost its message (Redis restarted
  empty): it is sent again. Duplicate messages are harmless, the worker's claim is conditional.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.models import Job
from app.jobs import state
from app.jobs.events import append_event
from app.queue import enqueue_after_commit

log = logging.getLogger("distillery.reaper")


def reap(session: Session, now: datetime, resend_after: float,
         queue_depth: Callable[[str], int | None] = lambda _q: None) -> dict[str, int]:
    """One reconciliation pass. Does not commit; sends happen after the caller commits.

    ``queue_depth(queue)`` tells how many messages wait on the broker; stale queued jobs are re-sent
    only when their queue is empty (or the depth is unknown), so a long backlog is not flooded
    with duplicates.
    """
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "resent": 0}
    expired = session.scalars(select(Job).where(Job.status.in_((state.RUNNING, state.CANCELLING)),
                                                Job.lease_expires_at < now)).all()
    for job in expired:
        try:
            if job.status == state.CANCELLING:
                state.transition(session, job.id, state.CANCELLED, allowed_from={state.CANCELLING}, now=now,
                                 error_code="cancelled", error_message="cancelled by the client")
                counts["cancelled"] += 1
            elif job.attempts < job.max_attempts:
                state.transition(session, job.id, state.QUEUED, allowed_from={state.RUNNING}, now=now,
                                 lease_expires_at=None, worker_id=None)
                append_event(session, job.id, "requeued", f"worker lost during attempt {job.attempts}; retrying",
                             level="warning")
                enqueue_after_commit(session, job.id, job.queue)
                counts["requeued"] += 1
            else:
                state.transition(session, job.id, state.FAILED, allowed_from={state.RUNNING}, now=now,
                                 error_code="worker_lost",
                                 error_message=f"the worker stopped responding in each of {job.attempts} attempts")
                counts["failed"] += 1
        except state.InvalidTransition:
            continue  # it moved on its own meanwhile
    stale = session.scalars(select(Job).where(Job.status == state.QUEUED,
                                              Job.updated_at < now - timedelta(seconds=resend_after))).all()
    depths: dict[str, int | None] = {}
    for job in stale:
        if job.queue not in depths:
            depths[job.queue] = queue_depth(job.queue)
        if depths[job.queue]:
            continue  # messages are waiting: this job's is most likely among them
        session.execute(update(Job).where(Job.id == job.id, Job.status == state.QUEUED).values(updated_at=now))
        enqueue_after_commit(session, job.id, job.queue)
        counts["resent"] += 1
    if any(counts.values()):
        log.info("reaper: %s", counts)
    return counts
