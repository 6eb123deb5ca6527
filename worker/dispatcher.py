"""Publish the outbox, re-send lost messages, reap expired leases — on one leader at a time.

* :func:`publish_due` sends unsent :class:`~app.db.models.Dispatch` rows oldest first with bounded broker
  calls (:func:`app.queue.publish`), records ``sent_at``, and stops at the first failure (the broker is
  down or hung: the next pass tries again; nothing waits on it but this thread).
* :func:`resend_lost` finds queued jobs whose message the broker lost (a restarted Redis, a FLUSHDB): per
  queue, the jobs that should have a message waiting outnumber the messages waiting (``queue_depth``), so
  the oldest of them — last sent more than ``resend_after`` seconds ago — get a new dispatch. Duplicates are
  harmless (the claim is conditional) and the count keeps them few. When the transport cannot say its depth
  (the SQLite queue, which does not lose messages), a job is re-sent only after a minute in the queue.
* The reaper (:func:`app.jobs.reaper.reap`) requeues jobs whose lease expired.

Only the leader runs these (:class:`Leadership`, a PostgreSQL advisory lock on its own connection, so the
lock goes with the connection if the process dies); on SQLite the one embedded worker leads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, create_engine, func, select, text, update
from sqlalchemy.pool import NullPool

from app.clock import utcnow
from app.db.models import Dispatch, Job
from app.db.session import get_engine, session_scope
from app.jobs import state
from app.jobs.reaper import reap
from app.queue import dispatch, publish

log = logging.getLogger("distillery.dispatcher")
LOCK_KEY = 0x44697374  # "Dist": the advisory lock every worker competes for
#: Without a depth (SQLite queue), a queued job is re-sent after this long.
RESEND_WITHOUT_DEPTH = 60.0
BATCH = 100


class Leadership:
    """Holds ``pg_try_advisory_lock`` on a dedicated, unpooled connection; :meth:`held` re-checks it each pass."""

    def __init__(self, engine: Engine | None = None):
        engine = engine or get_engine()
        self.sqlite = engine.dialect.name == "sqlite"
        self._engine = None if self.sqlite else create_engine(engine.url, poolclass=NullPool,
                                                              isolation_level="AUTOCOMMIT")
        self._conn = None

    def held(self) -> bool:
        if self.sqlite:
            return True
        try:
            if self._conn is None:
                conn = self._engine.connect()
                if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar():
                    conn.close()
                    return False
                self._conn = conn
                log.info("this worker now leads dispatch and reaping")
            else:
                self._conn.execute(text("SELECT 1"))  # the lock lives as long as this connection does
            return True
        except Exception as exc:  # the database is away: nobody leads until it is back
            log.warning("leadership check failed (%s)", exc.__class__.__name__)
            self.release()
            return False

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None


def publish_due(now: datetime | None = None, send: Callable[[str, str], None] = publish) -> int:
    """Publish unsent dispatches oldest first; returns how many were settled (sent, or no longer needed because
    their job left the queue)."""
    with session_scope() as s:
        due = s.execute(select(Dispatch.id, Dispatch.job_id, Dispatch.queue, Job.status)
                        .join(Job, Job.id == Dispatch.job_id).where(Dispatch.sent_at.is_(None))
                        .order_by(Dispatch.id).limit(BATCH)).all()
    sent = 0
    for row in due:
        if row.status == state.QUEUED:
            try:
                send(row.job_id, row.queue)
            except Exception as exc:  # broker down or hung (bounded): keep it unsent, try next pass
                with session_scope() as s:
                    s.execute(update(Dispatch).where(Dispatch.id == row.id)
                              .values(tries=Dispatch.tries + 1, last_error=f"{exc.__class__.__name__}: {exc}"[:500]))
                log.warning("could not publish job %s (%s); it stays in the outbox", row.job_id,
                            exc.__class__.__name__)
                break
        sent += 1
        with session_scope() as s:  # a job no longer queued needs no message: settle its row unsent
            s.execute(update(Dispatch).where(Dispatch.id == row.id)
                      .values(sent_at=now or utcnow(), tries=Dispatch.tries + 1))
    return sent


def resend_lost(now: datetime, resend_after: float, queue_depth: Callable[[str], int | None]) -> int:
    """New dispatches for queued jobs whose message is most likely lost (see the module doc); returns how many."""
    with session_scope() as s:
        last_sent = (select(Dispatch.job_id, func.max(Dispatch.sent_at).label("sent_at"),
                            func.count().filter(Dispatch.sent_at.is_(None)).label("unsent"))
                     .group_by(Dispatch.job_id).subquery())
        rows = s.execute(select(Job.id, Job.queue, last_sent.c.sent_at, last_sent.c.unsent)
                         .outerjoin(last_sent, last_sent.c.job_id == Job.id)
                         .where(Job.status == state.QUEUED).order_by(Job.created_at, Job.id)).all()
        by_queue: dict[str, list] = {}
        for r in rows:
            if not r.unsent:  # a dispatch still waiting to be published covers it
                by_queue.setdefault(r.queue, []).append(r)
        resent = 0
        for queue, jobs in by_queue.items():
            depth = queue_depth(queue)
            if depth is None:
                stale = [r for r in jobs if r.sent_at is None or r.sent_at < now - timedelta(seconds=RESEND_WITHOUT_DEPTH)]
            else:
                eligible = [r for r in jobs if r.sent_at is None or r.sent_at < now - timedelta(seconds=resend_after)]
                stale = eligible[:max(0, len(jobs) - depth)]
            for r in stale:
                dispatch(s, r.id, queue, reason="resent")
                resent += 1
        # Keep the outbox small: settled rows older than a day tell nothing anymore.
        s.execute(Dispatch.__table__.delete().where(Dispatch.sent_at < now - timedelta(days=1)))
    if resent:
        log.info("re-sending %d queued job(s) whose message the broker lost", resent)
    return resent


class Dispatcher:
    """The leader's loops, as daemon threads: publish every ``interval``, re-send and reap every few seconds."""

    def __init__(self, *, interval: float, resend_after: float, reap_every: float,
                 queue_depth: Callable[[str], int | None]):
        self.interval, self.resend_after, self.reap_every = interval, resend_after, reap_every
        self.queue_depth = queue_depth
        self.stop = threading.Event()
        self.leader = Leadership()

    def start(self) -> None:
        threading.Thread(target=self._publish_loop, name="distillery-dispatch", daemon=True).start()
        threading.Thread(target=self._reap_loop, name="distillery-reaper", daemon=True).start()

    def _publish_loop(self) -> None:
        last_check = 0.0
        while not self.stop.wait(self.interval):
            try:
                if not self.leader.held():
                    continue
                publish_due()
                now = utcnow()
                if now.timestamp() - last_check >= self.resend_after:
                    last_check = now.timestamp()
                    if resend_lost(now, self.resend_after, self.queue_depth):
                        publish_due()
            except Exception:
                log.exception("dispatch pass failed; trying again")

    def _reap_loop(self) -> None:
        # Its own thread: a hung broker (the publish loop) never delays requeueing a dead worker's job.
        while not self.stop.wait(self.reap_every):
            try:
                if self.leader.held():
                    with session_scope() as s:
                        reap(s, utcnow())
            except Exception:
                log.exception("reaper pass failed; trying again")
