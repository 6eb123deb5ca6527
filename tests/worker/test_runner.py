"""The worker's job runner in-process against PostgreSQL: every outcome ends in a known state."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

from tests.support.jobs import job_body


@pytest.fixture()
def queued_job(client, make_key, uploaded) -> str:
    h = make_key("runner")
    m, d = uploaded(h)
    return client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()["id"]


def _job(job_id: str):
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as s:
        return s.get(Job, job_id)


def test_a_crash_fails_the_job_with_the_reason(queued_job, monkeypatch):
    from worker import engine, runner

    def boom(*_a, **_k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine, "run", boom)
    assert runner.run_job(queued_job) == "failed"
    job = _job(queued_job)
    assert (job.status, job.error_code, job.attempts) == ("failed", "internal_error", 1)
    assert "disk on fire" in job.error_message
    assert runner.run_job(queued_job) == "skipped"  # a redelivered message finds it finished


def test_a_lost_database_leaves_the_job_to_the_reaper(queued_job, monkeypatch):
    from app.storage import get_storage
    from worker import engine, runner

    checkpoint = get_storage().local_path(f"checkpoints/{queued_job}")

    def db_gone(*_a, checkpoint_dir, **_k):
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (checkpoint_dir / "checkpoint.pt").write_bytes(b"progress so far")
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    monkeypatch.setattr(engine, "run", db_gone)
    with pytest.raises(OperationalError):
        runner.run_job(queued_job)
    job = _job(queued_job)
    assert job.status == "running" and job.lease_expires_at is not None  # the reaper will requeue it
    assert (checkpoint / "checkpoint.pt").exists()  # and the next attempt resumes from here
