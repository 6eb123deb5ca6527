"""Chaos: the broker hangs (SIGSTOP) or loses its data (FLUSHALL) while jobs are submitted and waiting. Real
processes on a Redis and a database of their own (:mod:`tests.integration.chaos_stack`); recovery times are
printed (``pytest -s -n0``) and recorded in docs/operations.md."""

from __future__ import annotations

import time

import pytest

from tests.integration.chaos_stack import client_of, db_now, first_sent, long, tiny
from tests.support.chaos import TERMINAL, assert_each_ran_once, submit_many, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]  # the chaos suite


#: Seconds the broker stays frozen: several of the API's bounded broker timeouts (2 s) and readiness probes long.
HANG = 12


def test_a_hung_broker_never_slows_submission_and_jobs_go_out_when_it_answers(chaos_stack):
    """SIGSTOP the broker for HANG seconds while submitting: every POST answers 202 within 1 s, /readyz says 503
    within its timeout, and every job is published within 15 s of the broker answering again."""
    m, d = chaos_stack.inputs
    chaos_stack.redis.hang()
    latencies, ids = [], []
    try:
        with client_of(chaos_stack) as c:
            began = time.monotonic()
            r = c.get("/readyz")
            ready_took = time.monotonic() - began
            assert r.status_code == 503 and r.json()["code"] == "broker_unavailable", r.text
            hung_at = time.monotonic()
            while time.monotonic() - hung_at < HANG:
                began = time.monotonic()
                r = c.post("/v1/jobs", json=tiny(m, d))
                latencies.append(time.monotonic() - began)
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
                time.sleep(2.0)  # pacing the submissions over the outage, not synchronisation
    finally:
        chaos_stack.redis.resume()
    resumed = db_now(chaos_stack)
    took = wait_until(lambda: len(first_sent(chaos_stack, ids)) == len(ids), 60, "every job to be published")
    wait_until(lambda: all(s in TERMINAL for s in chaos_stack.statuses(ids).values()), 180, "the jobs to end")
    assert_each_ran_once(chaos_stack.jobs(ids))
    sent = first_sent(chaos_stack, ids)
    worst = max((t - resumed).total_seconds() for t in sent.values())
    print(f"CHAOS broker SIGSTOP {HANG} s: {len(ids)} POSTs, slowest {max(latencies) * 1000:.0f} ms; /readyz 503 in "
          f"{ready_took:.1f} s; all published {took:.1f} s after the broker answered (latest {worst:.1f} s)")
    assert max(latencies) < 1.0
    assert ready_took < 3.5
    assert took < 15

def test_a_flushed_broker_loses_no_job(chaos_stack):
    """Both workers busy, five jobs waiting in Redis, FLUSHALL: the dispatcher notices the queue is shorter than
    the queued jobs and re-sends them within 15 s; each runs once."""
    m, d = chaos_stack.inputs
    with client_of(chaos_stack) as c:
        busy = [c.post("/v1/jobs", json=long(m, d)).json()["id"] for _ in range(2)]
        wait_until(lambda: all(s == "running" for s in chaos_stack.statuses(busy).values()), 90, "both workers to be busy")
        waiting = submit_many(chaos_stack.http, chaos_stack.headers, [tiny(m, d) for _ in range(5)])
        redis = chaos_stack.redis.client()
        wait_until(lambda: redis.llen(chaos_stack.queue) == 5, 30, "the five messages to wait in Redis")
        flushed = db_now(chaos_stack)
        redis.flushall()
        try:
            took = wait_until(lambda: len(first_sent(chaos_stack, waiting, after=flushed)) == 5, 60,
                              "the lost messages to be re-sent")
        except AssertionError:
            rows = chaos_stack._rows("SELECT job_id, reason, created_at, sent_at FROM dispatches WHERE job_id = ANY(:ids) "
                                     "ORDER BY id", ids=waiting)
            raise AssertionError(f"flushed at {flushed}; dispatches: {[tuple(r) for r in rows]}; "
                                 f"jobs: {chaos_stack.statuses(waiting)}") from None
        for job_id in busy:  # free the workers; their own messages went with the flush too
            assert c.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    wait_until(lambda: all(s in TERMINAL for s in chaos_stack.statuses(busy + waiting).values()), 180, "the jobs to end")
    assert {chaos_stack.statuses(busy)[j] for j in busy} == {"cancelled"}
    assert_each_ran_once(chaos_stack.jobs(waiting))
    print(f"CHAOS broker FLUSHALL with 5 jobs waiting: all re-sent {took:.1f} s after the flush; each ran once")
    assert took < 15
