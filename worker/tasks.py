"""Celery tasks. Thin: the work is in :mod:`worker.runner`; the dispatcher and reaper run beside the consumer."""

from __future__ import annotations

import logging

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from app.queue import RUN_JOB
from app.settings import get_settings
from worker import prestart, runner
from worker.celery_app import celery_app
from worker.dispatcher import Dispatcher

log = logging.getLogger("distillery.worker")
_dispatcher: Dispatcher | None = None


@celery_app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    try:
        return runner.run_job(job_id)
    finally:
        # The next job's executor starts now, while this worker waits for that job (worker/prestart.py) — unless
        # the worker is stopping (it handed this job back): then there is no next job here.
        if not runner.RELEASE.is_set():
            prestart.prepare(get_settings())


def queue_depth(queue: str) -> int | None:
    """Messages waiting in ``queue`` on the broker (bounded by the transport's socket timeouts), or None when
    the transport cannot say or does not answer."""
    from kombu.exceptions import ChannelError

    try:
        with celery_app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            try:
                return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
            except ChannelError as exc:
                # "NOT_FOUND - no queue": Redis drops a list when its last message is taken (or the data is
                # flushed), so a queue that does not exist has no messages waiting: depth 0, not unknown.
                if "NOT_FOUND" in str(exc):
                    return 0
                raise
    except Exception:
        return None


@worker_ready.connect
def _start_dispatcher(**_kwargs) -> None:
    global _dispatcher
    s = get_settings()
    _dispatcher = Dispatcher(holder=runner.WORKER_ID, interval=s.dispatch_interval_seconds, resend_after=s.resend_after_seconds,
                             reap_every=min(max(s.lease_seconds / 10, 0.5), 2.0), queue_depth=queue_depth)
    _dispatcher.start()
    prestart.prepare(s)


@worker_shutting_down.connect
def _release_on_shutdown(sig=None, **_kwargs) -> None:
    # SIGTERM/SIGINT: the running attempt checkpoints and hands its job back instead of draining to the end.
    log.info("worker shutting down (%s): releasing the running job, if any", sig)
    runner.RELEASE.set()


@worker_shutdown.connect
def _stop_dispatcher(**_kwargs) -> None:
    prestart.shutdown()
    if _dispatcher is not None:
        _dispatcher.stop.set()
        _dispatcher.leader.release()
