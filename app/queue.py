"""The Celery application as seen by the API (send only) and shared configuration for the worker.

Tasks are sent by *name* so the API never imports the worker (or torch). Sending happens only
after the database transaction that created the job has committed (:func:`enqueue_after_commit`):
a worker must never receive a job id it cannot read, and a rolled-back job must never run.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.settings import Settings, get_settings

log = logging.getLogger("distillery.queue")

RUN_JOB = "distillery.run_job"
_PENDING = "distillery_pending_sends"


def make_celery(settings: Settings) -> Celery:
    app = Celery("distillery", broker=settings.resolved_broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],  # never pickle
        task_acks_late=True,  # a job message is acked only when the task returns...
        task_reject_on_worker_lost=True,  # ...and redelivered if the worker process dies mid-job
        worker_prefetch_multiplier=1,  # long jobs: do not hoard messages another worker could run
        task_ignore_result=True,  # results live in the SQL database, not the broker
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings.resolved_broker_url),
        task_default_queue=settings.job_queue,
        worker_hijack_root_logger=False,
    )
    return app


def _transport_options(url: str) -> dict:
    if url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands these to create_engine: wait on a locked SQLite file
        # (API and worker share it) instead of failing.
        return {"connect_args": {"timeout": 30}} if "sqlite" in url else {}
    # Redis: an unacked message is redelivered after this long. Jobs can run for hours; the
    # lease/reaper, not this timeout, is what recovers a job from a dead worker.
    return {"visibility_timeout": 6 * 3600}


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def send_job(job_id: str, queue: str) -> None:
    """Publish one ``distillery.run_job`` message. Failures are logged: the reaper re-sends queued jobs."""
    try:
        get_celery().send_task(RUN_JOB, args=[job_id], queue=queue)
    except Exception:  # broker down: the job stays queued in SQL and is re-sent later
        log.exception("could not publish job %s; it stays queued and will be re-sent", job_id)


def enqueue_after_commit(session: Session, job_id: str, queue: str) -> None:
    """Send the job once ``session`` commits; drop it if the session rolls back."""
    session.info.setdefault(_PENDING, []).append((job_id, queue))


@event.listens_for(Session, "after_commit")
def _send_pending(session: Session) -> None:
    for job_id, queue in session.info.pop(_PENDING, []):
        send_job(job_id, queue)


@event.listens_for(Session, "after_soft_rollback")
def _drop_pending(session: Session, previous_transaction) -> None:
    if previous_transaction.parent is None:  # only the outermost rollback discards the request's work
        session.info.pop(_PENDING, None)
