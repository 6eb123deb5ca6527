"""The worker's job runner against PostgreSQL, with stand-in executors: every ending is a known state.

Each test replaces the executor's command line (``supervisor.executor_argv``) with a small Python program
that misbehaves in one way — crashes, lies, floods, hogs memory, sleeps — and runs it through the real
supervisor and sandbox. The real engine run is covered by the integration tests.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy.exc import OperationalError

from tests.support.jobs import job_body

pytestmark = pytest.mark.postgres  # against PostgreSQL, as in production with several workers


def _job(job_id: str):
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as s:
        return s.get(Job, job_id)


def _settings(**changes):
    from app.settings import get_settings

    return get_settings().model_copy(update=changes)


def _run(job_id: str, **changes) -> str:
    from worker import runner

    return runner.run_job(job_id, _settings(**changes))


def _events(job_id: str) -> list:
    from app.db.models import JobEvent
    from app.db.session import session_scope
    from sqlalchemy import select

    with session_scope() as s:
        return [(e.type, e.message, e.data) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                                                 .order_by(JobEvent.seq))]


def test_an_executor_killed_by_a_signal_fails_the_job_as_crashed(queued_job, executor):
    executor("import signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert _run(queued_job) == "failed"
    job = _job(queued_job)
    assert (job.status, job.error_code, job.attempts) == ("failed", "executor_crashed", 1)
    assert "SIGSEGV" in job.error_message
    assert _run(queued_job) == "skipped"  # a redelivered message finds it finished


def test_an_engine_error_reported_by_the_executor_keeps_its_code(queued_job, executor):
    executor('send({"type": "failed", "code": "invalid_dataset", "message": "column x is text"})')
    assert _run(queued_job) == "failed"
    job = _job(queued_job)
    assert (job.error_code, job.error_message) == ("invalid_dataset", "column x is text")


_SLEEP = "\nimport time; time.sleep(60)"


@pytest.mark.parametrize("code, reason", [
    ('print("not json at all", flush=True)' + _SLEEP, "protocol"),
    ('print("x" * (3 << 20), flush=True)' + _SLEEP, "protocol"),
    ('send({"type": "failed", "code": "made_up_code", "message": "x"})', "unknown code"),
    ('send({"type": "result", "status": "succeeded", "artifacts": [{"kind": "student", "format": "onnx", '
     '"path": "../../job.json"}]})', "not inside the output directory"),
    ('os.makedirs("out", exist_ok=True); os.symlink("/etc/passwd", "out/s.onnx"); '
     'send({"type": "result", "status": "succeeded", "artifacts": [{"kind": "student", "format": "onnx", '
     '"path": "s.onnx"}]})', "symbolic link"),
    ('send({"type": "result", "status": "succeeded"})' + _SLEEP, "did not exit"),
])
def test_an_executor_that_breaks_the_protocol_cannot_end_the_job_its_way(queued_job, executor, monkeypatch,
                                                                         code, reason):
    from worker import supervisor

    monkeypatch.setattr(supervisor, "FINAL_GRACE_SECONDS", 1.0)
    executor(code)
    assert _run(queued_job, executor_message_bytes=1 << 20) == "failed"
    job = _job(queued_job)
    assert job.error_code == "executor_crashed"
    assert reason in job.error_message


@pytest.mark.slow  # runs an executor into its limits on purpose
def test_a_memory_hog_is_stopped_and_the_next_job_runs(queued_job, executor, monkeypatch, client, make_key,
                                                        uploaded):
    # Touch 600 MiB page by page: resident memory, which the supervisor watches, grows past 256 MiB.
    executor("b = bytearray(600 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nimport time; time.sleep(30)")
    assert _run(queued_job, max_job_memory_bytes=256 << 20) == "failed"
    job = _job(queued_job)
    assert job.error_code == "resource_limit"
    assert "memory limit" in job.error_message and "DISTILLERY_MAX_JOB_MEMORY_BYTES" in job.error_message
    # The same worker process then runs a real job (the real executor and engine) to the end.
    monkeypatch.undo()
    h = make_key("runner-next")
    m, d = uploaded(h)
    from app.settings import get_settings
    from tests.support.fixtures import PARKED_QUEUE

    monkeypatch.setattr(get_settings(), "job_queue", PARKED_QUEUE)  # undone above with the rest
    nxt = client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()["id"]
    assert _run(nxt) == "succeeded", _job(nxt).error_message


@pytest.mark.slow  # runs an executor into its limits on purpose
def test_a_job_past_its_time_limit_is_stopped(queued_job, executor):
    executor("import time; time.sleep(60)")
    assert _run(queued_job, max_job_seconds=2) == "failed"
    job = _job(queued_job)
    assert (job.error_code, "DISTILLERY_MAX_JOB_SECONDS" in job.error_message) == ("resource_limit", True)


def test_messages_are_relayed_and_the_executor_sees_no_secrets(queued_job, executor):
    from app.settings import get_settings

    data_dir = get_settings().data_dir.resolve()
    executor(f"""
        job = json.load(open("job.json"))
        send({{"type": "event", "event": "probe", "message": "env",
              "data": {{"env": sorted(os.environ), "data_dir": sorted(os.listdir({str(data_dir)!r})), "teacher": os.path.getsize(job["teacher"]["path"])}}}})
        send({{"type": "metric", "step": 1, "epoch": 0, "name": "loss", "value": 0.5}})
        send({{"type": "failed", "code": "invalid_spec", "message": "done probing"}})
    """)
    assert _run(queued_job) == "failed"
    probe = next(d for t, _m, d in _events(queued_job) if t == "probe")
    assert not [k for k in probe["env"] if k.startswith("DISTILLERY_") or "URL" in k or "SECRET" in k]
    assert probe["teacher"] > 0  # its own input is readable ...
    from app import sandbox

    if sandbox.resolve_mode("auto") == "bwrap":
        # ... the data dir (database, every tenant's blobs) is not: only the path down to its own scratch
        assert probe["data_dir"] == ["work"]


def test_a_cancel_stops_a_silent_executor_within_seconds(queued_job, executor, client):
    import threading
    import time

    from app.db.session import session_scope
    from app.jobs import state

    executor("import time; time.sleep(120)")
    started = threading.Event()

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _job(queued_job).status != "running":
            time.sleep(0.05)
        with session_scope() as s:
            state.transition(s, queued_job, state.CANCELLING, allowed_from={state.RUNNING})
        started.set()

    t = threading.Thread(target=cancel_when_running)
    t.start()
    began = time.monotonic()
    assert _run(queued_job) == "cancelled"
    t.join()
    assert started.is_set() and time.monotonic() - began < 20


def test_a_lost_database_leaves_the_job_to_the_reaper(queued_job, executor, monkeypatch):
    from app.storage import get_storage
    from worker import checkpoints
    from worker.reporter import DbReporter

    executor("""
        os.makedirs("checkpoints", exist_ok=True)
        open("checkpoints/checkpoint.pt", "wb").write(b"progress so far")
        send({"type": "event", "event": "checkpoint_saved", "message": "saved", "level": "debug"})  # mirrored now
        send({"type": "progress", "progress": {"fraction": 0.5}})
        time.sleep(60)
    """)

    def db_gone(*_a, **_k):
        raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection"))

    monkeypatch.setattr(DbReporter, "progress", db_gone)
    with pytest.raises(OperationalError):
        _run(queued_job)
    job = _job(queued_job)
    assert job.status == "running" and job.lease_expires_at is not None  # the reaper will requeue it
    token = checkpoints.latest(get_storage(), queued_job)  # this attempt's own folder: the next attempt resumes
    assert token == job.lease_token
    with get_storage().open(f"checkpoints/{queued_job}/{token}/checkpoint.pt") as f:
        assert f.read() == b"progress so far"


def test_messages_are_schema_checked(executor):
    from worker.supervisor import Message

    with pytest.raises(ValueError):
        Message.validate_json(json.dumps({"type": "event", "event": "x", "message": "m" * 5000}))
    with pytest.raises(ValueError):
        Message.validate_json(json.dumps({"type": "metric", "step": -1, "epoch": 0, "name": "l", "value": 1}))
