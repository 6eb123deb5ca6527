"""Leases, fencing and release against PostgreSQL, with stand-in executors and the real supervisor.

* a phase longer than the lease (storing results here) keeps the job: the heartbeat renews it throughout;
* a stale attempt after a requeue changes nothing: no event, no status, no artifact;
* a release (worker shutdown) checkpoints, puts the job back without using up an attempt, and the next
  attempt resumes from that checkpoint and finishes with ``attempts == 1``.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from tests.support.jobs import RELEASING_EXECUTOR, run_until_released
from tests.support.wait import wait_until

pytestmark = pytest.mark.postgres  # against PostgreSQL, as in production with several workers


def _job(job_id: str):
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as s:
        return s.get(Job, job_id)


def _settings(**changes):
    from app.settings import get_settings

    return get_settings().model_copy(update=changes)


def _event_types(job_id: str) -> list[str]:
    from app.db.models import JobEvent
    from app.db.session import session_scope

    with session_scope() as s:
        return list(s.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))


@pytest.mark.slow  # waits out one and a half leases on purpose
def test_a_phase_longer_than_the_lease_keeps_the_job(queued_job, executor, monkeypatch):
    from app.clock import utcnow
    from app.db.session import session_scope
    from app.jobs.reaper import reap
    from worker import runner

    executor('send({"type": "result", "status": "succeeded", "metrics": {"ok": 1}, "artifacts": []})')
    real_store = runner._store_blobs

    def slow_store(*args):  # a slow upload of the results: 1.5 leases with no executor running
        time.sleep(7.5)
        return real_store(*args)

    monkeypatch.setattr(runner, "_store_blobs", slow_store)
    stop = threading.Event()
    requeued = []

    def reaper():
        while not stop.wait(0.25):
            with session_scope() as s:
                requeued.append(reap(s, utcnow())["requeued"])

    t = threading.Thread(target=reaper, daemon=True)
    t.start()
    try:
        assert runner.run_job(queued_job, _settings(lease_seconds=5)) == "succeeded"
    finally:
        stop.set()
        t.join()
    job = _job(queued_job)
    assert (job.status, job.attempts) == ("succeeded", 1) and sum(requeued) == 0 and len(requeued) > 20


def test_a_stale_attempt_changes_nothing(queued_job, executor):
    from app.db.models import Artifact
    from app.db.session import session_scope
    from app.jobs import state
    from worker import runner
    from worker.attempt import Attempt

    executor("""
        import time
        send({"type": "progress", "progress": {"fraction": 0.1}})
        while not os.path.exists("requeued"):  # the test takes the job away meanwhile, then says so here
            time.sleep(0.05)
        send({"type": "event", "event": "late", "message": "written after the requeue"})
        send({"type": "result", "status": "succeeded", "metrics": {}, "artifacts": []})
    """)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("ended", runner.run_job(queued_job, _settings())))
    t.start()
    wait_until(lambda: (_job(queued_job).progress or {}).get("fraction") == 0.1, 30, "the first attempt's progress")
    stale = _job(queued_job)
    with session_scope() as s:  # what the reaper does when it believes the worker lost, then a new claim
        state.transition(s, queued_job, state.QUEUED, allowed_from={state.RUNNING}, fence=stale.lease_token)
    second = runner._claim(queued_job, _settings())
    assert second is not None
    # The first attempt's scratch dir is its executor's working directory (work/<job>/<its lease token>).
    (_settings().data_dir / "work" / queued_job / stale.lease_token / "requeued").touch()
    t.join(30)
    assert result["ended"] == "skipped"
    job = _job(queued_job)
    assert (job.status, job.lease_token, job.attempts) == ("running", second.token, 2)
    assert "late" not in _event_types(queued_job) and not {"succeeded", "failed", "cancelled"} & set(
        _event_types(queued_job))
    with session_scope() as s:
        assert s.scalars(select(Artifact).where(Artifact.job_id == queued_job)).first() is None
    # The old attempt's own handle is fenced out too.
    old = Attempt(queued_job, stale.lease_token, 1, "old", 30)
    assert old.write("a test write", lambda s: None) is False and old.lost.is_set()
    assert runner._end(old, state.FAILED, "internal_error", "stale") == "skipped"
    assert _job(queued_job).status == "running"


def test_release_checkpoints_requeues_and_the_next_attempt_resumes(queued_job, executor):
    from app.db.models import Dispatch
    from app.db.session import session_scope
    from app.storage import get_storage
    from worker import checkpoints, runner

    executor(RELEASING_EXECUTOR)
    ended, released_in = run_until_released(queued_job, _settings())
    assert ended == "released" and released_in < 10
    job = _job(queued_job)
    assert (job.status, job.attempts, job.lease_token) == ("queued", 0, None)
    with session_scope() as s:
        reasons = list(s.scalars(select(Dispatch.reason).where(Dispatch.job_id == queued_job).order_by(Dispatch.id)))
    assert reasons == ["created", "released"]
    assert checkpoints.latest(get_storage(), queued_job) is not None
    assert runner.run_job(queued_job, _settings()) == "succeeded"
    job = _job(queued_job)
    assert (job.status, job.attempts) == ("succeeded", 1)
    assert "released" in _event_types(queued_job) and "resumed" in _event_types(queued_job)
    assert not list(get_storage().list(f"checkpoints/{queued_job}"))  # deleted after the guarded end
