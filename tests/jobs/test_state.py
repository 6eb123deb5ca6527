"""The guarded transition function and the reaper, against PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.support.jobs import job_body


@pytest.fixture()
def job_id(client, make_key, uploaded):
    h = make_key("state")
    m, d = uploaded(h)
    return client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()["id"]


def _status(job_id: str) -> str:
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as s:
        return s.get(Job, job_id).status


def test_transition_is_guarded(job_id):
    from app.db.session import session_scope
    from app.jobs import state

    with session_scope() as s:
        state.transition(s, job_id, state.RUNNING)
    with pytest.raises(state.InvalidTransition):  # a duplicate delivery cannot claim it again
        with session_scope() as s:
            state.transition(s, job_id, state.RUNNING)
    with pytest.raises(state.InvalidTransition):  # allowed_from can only narrow the table
        with session_scope() as s:
            state.transition(s, job_id, state.SUCCEEDED, allowed_from={state.QUEUED, state.RUNNING, "bogus"} - {
                state.RUNNING})
    with session_scope() as s:
        state.transition(s, job_id, state.SUCCEEDED)
    for to in (state.RUNNING, state.FAILED, state.CANCELLED, state.QUEUED):  # terminal is final
        with pytest.raises(state.InvalidTransition):
            with session_scope() as s:
                state.transition(s, job_id, to)
    assert _status(job_id) == state.SUCCEEDED


def test_reaper_requeues_expired_lease_then_fails_after_max_attempts(job_id):
    from app.clock import utcnow
    from app.db.models import Job
    from app.db.session import session_scope
    from app.jobs import state
    from app.jobs.reaper import reap

    now = utcnow()
    with session_scope() as s:
        state.transition(s, job_id, state.RUNNING, attempts=1, lease_expires_at=now - timedelta(seconds=1))
    with session_scope() as s:
        assert reap(s, now)["requeued"] == 1
    assert _status(job_id) == state.QUEUED
    with session_scope() as s:
        max_attempts = s.get(Job, job_id).max_attempts
        state.transition(s, job_id, state.RUNNING, attempts=max_attempts, lease_expires_at=now - timedelta(seconds=1))
    with session_scope() as s:
        assert reap(s, now)["failed"] == 1
        job = s.get(Job, job_id)
        assert job.status == state.FAILED and job.error_code == "worker_lost"
