"""The broker as seen by the API and the dispatcher: an outbox row on the request path, bounded publishes after.

Creating (or requeueing) a job writes a :class:`~app.db.models.Dispatch` row in the same transaction
(:func:`dispatch`); nothing talks to the broker on the request path, so a broker that hangs or is down
never slows ``POST /v1/jobs``. The dispatcher (:mod:`worker.dispatcher`) publishes those rows with
:func:`publish`, whose every broker call is bounded by connect/socket timeouts and a small retry budget.

Tasks are sent by *name* so the API never imports the worker (or torch).
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery
from sqlalchemy.orm import Session

from app.db.models import Dispatch
from app.settings import Settings, get_settings

log = logging.getLogger("distillery.queue")

RUN_JOB = "distillery.run_job"
#: Seconds any one broker socket operation may block (connect, send, receive). A SIGSTOPped Redis accepts
#: TCP connections and then never answers; without these a publish or a queue-depth probe hangs forever.
BROKER_CONNECT_TIMEOUT = 3.0
BROKER_SOCKET_TIMEOUT = 5.0
#: Publish retries: a few quick tries, then the dispatch stays unsent and the next pass tries again.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 0.5}


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
        broker_connection_timeout=BROKER_CONNECT_TIMEOUT,
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
    # lease/reaper, not this timeout, is what recovers a job from a dead worker. The socket timeout
    # must exceed the consumer's 1 s BRPOP poll.
    return {"visibility_timeout": 6 * 3600, "socket_connect_timeout": BROKER_CONNECT_TIMEOUT,
            "socket_timeout": BROKER_SOCKET_TIMEOUT, "socket_keepalive": True, "health_check_interval": 10,
            "max_connections": 20}


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def dispatch(session: Session, job_id: str, queue: str, reason: str = "created") -> None:
    """Make ``job_id`` due for a run message, in the caller's transaction (the outbox): committed with the job
    or not at all. The dispatcher publishes it within a second or two."""
    session.add(Dispatch(kind="run_job", job_id=job_id, queue=queue, reason=reason, tries=0))


def publish(job_id: str, queue: str) -> None:
    """Publish one ``distillery.run_job`` message, bounded in time; raises when the broker does not take it."""
    get_celery().send_task(RUN_JOB, args=[job_id], queue=queue, retry=True, retry_policy=PUBLISH_RETRY)


def send_job(job_id: str, queue: str) -> None:
    """Publish directly (operators' and tests' tool; jobs go through :func:`dispatch`). Failures are logged."""
    try:
        publish(job_id, queue)
    except Exception:
        log.exception("could not publish job %s", job_id)
