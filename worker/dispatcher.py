"""Publish the outbox, re-send lost messages, reap expired leases — on one leader at a time.

* :func:`publish_due` sends unsent :class:`~app.db.models.Dispatch` rows oldest first with bounded broker
  calls (:func:`app.queue.publish`), records ``sent_at``, and stops at the first failure (the broker is
  down or hung: the next pass tries again; nothing waits on it but this thread).
* :func:`resend_lost` finds queued jobs whose message the broker lost (a restarted Redis, a FLUSHDB): per
  queue, the jobs that should have a message waiting outnumber the messages waiting (``queue_depth``); the
  waiting ones are those sent most recently, so the others — last sent more than ``resend_after`` seconds
  ago — get a new dispatch, oldest job first. Duplicates are
  harmless (the claim is conditional) and the count keeps them few. When the transport cannot say its depth
  (the SQLite queue, which does not lose messages), a job is re-sent only after a minute in the queue.
* The reaper (:func:`app.jobs.reaper.reap`) requeues jobs whose lease expired.
* The webhook sender (:mod:`worker.webhooks`) sends due webhook deliveries.
* The search coordinator (:mod:`worker.search`) advances student searches: asks, prunes and ends their trials.

Only the leader runs these (:class:`Leadership`, a lease row every worker competes for: a leader that dies
or freezes is replaced within :data:`LEADER_TTL` seconds).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, UTC

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from app.clock import utcnow
from app.db.models import Dispatch, Job, LeaderLease
from app.db.session import session_scope
from app.jobs import state
from app.jobs.reaper import reap
from app.queue import dispatch, publish
from app.settings import get_settings

log = logging.getLogger("distillery.dispatcher")
#: Seconds a leader's lease lasts without renewal: how long a dead or frozen leader delays dispatch and reaping.
LEADER_TTL = 6.0
#: Seconds of reachable database the reaper waits for after an outage before it requeues expired leases.
REAP_GRACE_AFTER_OUTAGE = 10.0
#: Without a depth (SQLite queue), a queued job is re-sent after this long.
RESEND_WITHOUT_DEPTH = 60.0
BATCH = 100
_NEVER = datetime.min.replace(tzinfo=UTC)


class Leadership:
    """A renewable lease on the ``dispatcher`` row of ``leader_leases``: :meth:`held` is True while this process
    leads. Taking or renewing is one conditional UPDATE (ours, or expired), so two processes never both
    succeed; a leader that dies, or freezes, loses the duty once its lease runs out (``ttl`` seconds) and the
    next process to ask takes it. The lease is renewed at most every ``ttl / 3`` (a local monotonic clock
    decides when; a pause longer than that makes the next call ask the database again, so a leader that was
    frozen learns it was replaced before it acts). Works the same on PostgreSQL and SQLite.

    What a replaced leader may still do in a pass already under way is harmless by construction: a
    duplicate publish is absorbed by the conditional claim, and reaping is fenced by each job's lease token."""

    def __init__(self, holder: str, ttl: float = LEADER_TTL, name: str = "dispatcher"):
        self.holder, self.ttl, self.name = holder, ttl, name
        self.token: str | None = None
        self.failed = False  # the last check could not reach the database
        self._checked = float("-inf")  # monotonic time of the last successful take or renewal

    def held(self) -> bool:
        if self.token is not None and time.monotonic() - self._checked < self.ttl / 3:
            return True
        try:
            held = self._renew_or_take()
        except Exception as exc:  # the database is away: nobody leads until it is back
            log.warning("leadership check failed (%s)", exc.__class__.__name__)
            self.token, self.failed = None, True
            return False
        self.failed = False
        return held

    def _renew_or_take(self) -> bool:
        now, began = utcnow(), time.monotonic()
        until = now + timedelta(seconds=self.ttl)
        with session_scope() as s:
            if self.token is not None:  # renew our tenure, if it is still ours
                if s.execute(update(LeaderLease).where(LeaderLease.name == self.name,
                                                       LeaderLease.token == self.token)
                             .values(expires_at=until)).rowcount == 1:
                    self._checked = began
                    return True
                log.warning("another worker leads dispatch and reaping now")
                self.token = None
            token = secrets.token_hex(16)
            taken = s.execute(update(LeaderLease).where(LeaderLease.name == self.name, LeaderLease.expires_at < now)
                              .values(holder=self.holder, token=token, expires_at=until)).rowcount == 1
            if not taken and s.get(LeaderLease, self.name) is None:
                s.add(LeaderLease(name=self.name, holder=self.holder, token=token, expires_at=until))
                try:
                    s.flush()
                    taken = True
                except IntegrityError:  # another process inserted it first: it leads
                    s.rollback()
        if taken:
            self.token, self._checked = token, began
            log.info("this worker now leads dispatch and reaping")
        return taken

    def release(self) -> None:
        """Give the duty up now (a stopping worker), so the next process need not wait for the lease to expire."""
        if self.token is None:
            return
        token, self.token = self.token, None
        try:
            with session_scope() as s:
                s.execute(update(LeaderLease).where(LeaderLease.name == self.name, LeaderLease.token == token)
                          .values(expires_at=utcnow() - timedelta(seconds=1)))
        except Exception:
            pass


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
                         .where(Job.status == state.QUEUED, Job.role != "search")  # searches get no message
                         .order_by(Job.created_at, Job.id)).all()
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
                # A queue hands messages out in the order they were sent, so the `depth` messages still waiting
                # are those of the jobs sent most recently; the rest are the lost ones. (Counting by creation
                # instead re-sent the same old job again while its new message was still waiting.)
                latest_first = sorted(jobs, key=lambda r: r.sent_at or _NEVER, reverse=True)
                missing = {r.id for r in latest_first[depth:]}
                stale = [r for r in jobs if r.id in missing
                         and (r.sent_at is None or r.sent_at < now - timedelta(seconds=resend_after))]
            for r in stale:
                dispatch(s, r.id, queue, reason="resent")
                resent += 1
        # Keep the outbox small: settled rows older than a day tell nothing anymore.
        s.execute(Dispatch.__table__.delete().where(Dispatch.sent_at < now - timedelta(days=1)))
    if resent:
        log.info("re-sending %d queued job(s) whose message the broker lost", resent)
    return resent


class Dispatcher:
    """The leader's loops, as daemon threads: publish every ``interval``, re-send and reap every few seconds,
    send webhook deliveries every ``interval``."""

    def __init__(self, *, holder: str, interval: float, resend_after: float, reap_every: float,
                 queue_depth: Callable[[str], int | None]):
        self.interval, self.resend_after, self.reap_every = interval, resend_after, reap_every
        self.queue_depth = queue_depth
        self.stop = threading.Event()
        self.leader = Leadership(holder)
        self._reap_from = 0.0  # monotonic: no reaping before this (see _reap_loop)

    def start(self) -> None:
        from worker.webhooks import WebhookSender  # it builds on Leadership, defined here

        threading.Thread(target=self._publish_loop, name="distillery-dispatch", daemon=True).start()
        threading.Thread(target=self._reap_loop, name="distillery-reaper", daemon=True).start()
        # Its own thread too: webhook receivers, however slow, never delay dispatch or reaping.
        sender = WebhookSender(get_settings(), self.leader, self.stop, self.interval)
        threading.Thread(target=sender.run, name="distillery-webhooks", daemon=True).start()
        # Student searches (worker/search.py): their own thread too, so reading trial reports never delays dispatch.
        from worker.search import Coordinator

        coordinator = Coordinator(get_settings(), self.leader, self.stop, max(self.interval, 1.0))
        threading.Thread(target=coordinator.run, name="distillery-search", daemon=True).start()

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
        # After the database was away, every lease ran out with no way to renew it: reaping at once would
        # requeue healthy jobs whose heartbeat has not caught up yet. So reaping waits until the database
        # has been reachable for REAP_GRACE_AFTER_OUTAGE seconds (heartbeats retry every second or so).
        while not self.stop.wait(self.reap_every):
            try:
                if not self.leader.held():
                    if self.leader.token is None and self.leader.failed:
                        self._reap_from = time.monotonic() + REAP_GRACE_AFTER_OUTAGE
                    continue
                if time.monotonic() < self._reap_from:
                    continue
                with session_scope() as s:
                    reap(s, utcnow())
            except Exception as exc:
                self._reap_from = time.monotonic() + REAP_GRACE_AFTER_OUTAGE
                log.warning("reaper pass failed (%s); reaping resumes %.0f s after the database answers again",
                            exc.__class__.__name__, REAP_GRACE_AFTER_OUTAGE)
