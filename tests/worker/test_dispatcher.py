"""The outbox and the dispatcher against PostgreSQL: nothing on the request path talks to the broker;
unsent dispatches go out oldest first; a failed publish stays in the outbox; lost messages are re-sent."""

from __future__ import annotations

import secrets
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from tests.support.jobs import job_body

pytestmark = pytest.mark.postgres  # against PostgreSQL, as in production with several workers


@pytest.fixture()
def dispatcher_paused(celery_worker):
    """This test leads dispatch instead of the session's worker: the lease row is taken over (as by a worker
    that found it expired), and the test goes on once the worker has noticed that it no longer leads (it
    logs so at its next renewal, at most 2 s later); the lease is handed back at the end."""
    from app.clock import utcnow
    from app.db.models import LeaderLease
    from app.db.session import session_scope

    leads, notice = "this worker now leads dispatch and reaping", "another worker leads dispatch and reaping now"
    log = celery_worker.log_path

    def counts() -> tuple[int, int]:
        text = log.read_text(errors="replace")
        return text.count(leads), text.count(notice)

    def lease() -> LeaderLease | None:
        with session_scope() as s:
            row = s.get(LeaderLease, "dispatcher")
            if row is not None:
                s.expunge(row)
            return row

    # Wait until the worker holds a live lease (again, after an earlier test handed it back): read from the
    # lease row itself, not from counting log lines, which an earlier renewal hiccup can leave unbalanced.
    deadline = time.monotonic() + 30
    while (row := lease()) is None or row.holder == "test" or row.expires_at <= utcnow():
        assert time.monotonic() < deadline, f"the worker did not take the lead (lease: {row and vars(row)})"
        time.sleep(0.1)
    seen = counts()[1]
    with session_scope() as s:
        s.execute(update(LeaderLease).where(LeaderLease.name == "dispatcher")
                  .values(holder="test", token="test-" + secrets.token_hex(8), expires_at=utcnow() + timedelta(hours=1)))
    deadline = time.monotonic() + 30
    while counts()[1] <= seen:
        assert time.monotonic() < deadline, "the worker did not give up leading"
        time.sleep(0.1)
    yield
    with session_scope() as s:
        s.execute(update(LeaderLease).where(LeaderLease.name == "dispatcher", LeaderLease.holder == "test")
                  .values(expires_at=utcnow() - timedelta(seconds=1)))


@pytest.fixture()
def jobs_on_own_queue(client, make_key, uploaded, dispatcher_paused):
    """``make(n)``: n queued jobs moved to a queue no other test uses (their dispatches unsent)."""
    from app.db.models import Dispatch, Job
    from app.db.session import session_scope

    h = make_key("dispatch")
    m, d = uploaded(h)
    queue = "q" + secrets.token_hex(6)

    def make(n: int) -> tuple[str, list[str]]:
        ids = [client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()["id"] for _ in range(n)]
        with session_scope() as s:
            s.execute(update(Job).where(Job.id.in_(ids)).values(queue=queue))
            s.execute(update(Dispatch).where(Dispatch.job_id.in_(ids)).values(queue=queue))
        return queue, ids

    return make


def test_creating_a_job_writes_a_dispatch_and_publishes_nothing(jobs_on_own_queue, monkeypatch):
    from app import queue as q
    from app.db.models import Dispatch
    from app.db.session import session_scope

    def no_broker(*_a, **_k):
        raise AssertionError("the request path must not call the broker")

    monkeypatch.setattr(q, "publish", no_broker)
    monkeypatch.setattr(q, "get_celery", no_broker)
    _, (job_id,) = jobs_on_own_queue(1)
    with session_scope() as s:
        row = s.scalars(select(Dispatch).where(Dispatch.job_id == job_id)).one()
    assert (row.reason, row.sent_at, row.tries) == ("created", None, 0)


def test_publish_due_oldest_first_and_a_failure_stays_unsent(jobs_on_own_queue):
    from app.db.models import Dispatch
    from app.db.session import session_scope
    from worker.dispatcher import publish_due

    while publish_due(send=lambda *_: None):  # what other tests left in the shared outbox
        pass
    queue, ids = jobs_on_own_queue(3)

    def broken(job_id, q):
        raise ConnectionError("broker hung")

    publish_due(send=broken)  # the broker is down: nothing is lost, the error is recorded
    with session_scope() as s:
        rows = s.scalars(select(Dispatch).where(Dispatch.job_id.in_(ids)).order_by(Dispatch.id)).all()
    assert all(r.sent_at is None for r in rows) and "broker hung" in (rows[0].last_error or "")
    sent = []
    while publish_due(send=lambda job_id, q: sent.append(job_id)):
        pass
    assert [j for j in sent if j in ids] == ids  # oldest first
    with session_scope() as s:
        assert all(r.sent_at is not None for r in s.scalars(select(Dispatch).where(Dispatch.job_id.in_(ids))))


def test_lost_messages_are_resent_as_many_as_are_missing(jobs_on_own_queue):
    from app.clock import utcnow
    from app.db.models import Dispatch
    from app.db.session import session_scope
    from worker.dispatcher import publish_due, resend_lost

    queue, ids = jobs_on_own_queue(3)
    while publish_due(send=lambda *_: None):
        pass
    later = utcnow() + timedelta(seconds=10)
    depth = {queue: 3}
    assert resend_lost(later, 5.0, lambda q: depth.get(q, 10**6)) == 0  # every message is waiting
    depth[queue] = 1  # the broker lost two: the two oldest are re-sent
    assert resend_lost(later, 5.0, lambda q: depth.get(q, 10**6)) == 2
    with session_scope() as s:
        resent = list(s.scalars(select(Dispatch.job_id).where(Dispatch.job_id.in_(ids),
                                                               Dispatch.reason == "resent").order_by(Dispatch.id)))
    assert resent == ids[:2]
    # Not sent again while those dispatches wait to be published.
    depth[queue] = 0
    assert resend_lost(later, 5.0, lambda q: depth.get(q, 10**6)) == 1
    # Once published, the re-sent messages are the ones waiting (a queue is FIFO): with two messages waiting,
    # the lost one is the job sent longest ago — not the oldest job again, whose new message is still queued.
    while publish_due(send=lambda *_: None):
        pass
    with session_scope() as s:
        s.execute(update(Dispatch).where(Dispatch.job_id.in_(ids[:2]), Dispatch.reason == "resent")
                  .values(sent_at=later))
    depth[queue] = 2
    assert resend_lost(later + timedelta(seconds=10), 5.0, lambda q: depth.get(q, 10**6)) == 1
    with session_scope() as s:
        last = s.scalars(select(Dispatch.job_id).where(Dispatch.job_id.in_(ids)).order_by(Dispatch.id.desc())).first()
    assert last == ids[2]


def test_one_leader_at_a_time_and_a_frozen_leader_is_replaced(backend, monkeypatch):
    """Two processes' Leadership objects on one lease row: only one holds it; when the holder stops renewing
    (it froze), the other takes over once the lease expires, and the old holder, asked again, knows it lost."""
    from app.db.models import LeaderLease
    from app.db.session import session_scope
    from worker import dispatcher

    name = "test-" + secrets.token_hex(4)
    a, b = dispatcher.Leadership("a", ttl=30, name=name), dispatcher.Leadership("b", ttl=30, name=name)
    assert a.held() and not b.held()
    assert a.held()  # renewed (or answered locally): still a's
    with session_scope() as s:  # a froze for longer than its lease: it expired meanwhile
        s.execute(update(LeaderLease).where(LeaderLease.name == name)
                  .values(expires_at=LeaderLease.expires_at - timedelta(seconds=60)))
    assert b.held()
    monkeypatch.setattr(a, "_checked", a._checked - 60)  # a's monotonic clock ran on while it was frozen
    assert not a.held() and a.token is None
    b.release()
    assert a.held()
    with session_scope() as s:
        assert s.get(LeaderLease, name).holder == "a"


def test_queue_depth_counts_waiting_messages_and_a_queue_redis_dropped_is_empty(backend):
    """Redis deletes a list with its last message (and FLUSHALL deletes everything): such a queue has depth 0,
    not "unknown" — which would make lost messages wait a minute for the no-depth fallback. And a publish
    after the binding was flushed still reaches the queue."""
    import redis

    from app.queue import publish
    from tests.support.services import REDIS_URL
    from worker.tasks import queue_depth

    queue = "q" + secrets.token_hex(6)
    try:
        assert queue_depth(queue) == 0
        publish("job_never_run", queue)
        publish("job_never_run", queue)
        assert queue_depth(queue) == 2
        redis.Redis.from_url(REDIS_URL).delete(queue)
        assert queue_depth(queue) == 0
        # A flushed or restarted Redis also forgets the queue's binding: a publish must still arrive (kombu routes a
    # direct exchange named like the queue without it; this guards that the dispatcher can rely on it).
        redis.Redis.from_url(REDIS_URL).delete(f"_kombu.binding.{queue}")
        publish("job_never_run", queue)
        assert queue_depth(queue) == 1
    finally:
        redis.Redis.from_url(REDIS_URL).delete(queue, f"_kombu.binding.{queue}")
