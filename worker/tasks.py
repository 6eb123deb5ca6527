"""Celery tasks. Thin: the work is in :mod:`worker.runner`; the reaper runs beside the consumer."""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown

from app.clock import utcnow
from app.db.session import session_scope
from app.jobs.reaper import reap
from app.queue import RUN_JOB
from app.settings import get_settings
from worker import runner
from worker.celery_app import celery_app

log = logging.getLogger("distillery.worker")
_stop = threading.Event()


@celery_app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    return runner.run_job(job_id)


def queue_depth(queue: str) -> int | None:
    """Messages waiting in ``queue`` on the broker, or None when the transport cannot say."""
    try:
        with celery_app.connection_for_read() as conn:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
    except Exception:
        return None


def reaper_loop(interval: float) -> None:
    while not _stop.wait(interval):
        try:
            with session_scope() as s:
                reap(s, utcnow(), resend_after=max(4 * interval, 60.0), queue_depth=queue_depth)
        except Exception:  # the database may be briefly away; try again next tick
            log.exception("reaper pass failed")


@worker_ready.connect
def _start_reaper(**_kwargs) -> None:
    interval = max(get_settings().lease_seconds / 4, 2.0)
    threading.Thread(target=reaper_loop, args=(interval,), name="distillery-reaper", daemon=True).start()


@worker_shutdown.connect
def _stop_reaper(**_kwargs) -> None:
    _stop.set()
