"""An executor started before its job (worker/prestart.py): the real sandbox (bubblewrap where it works), the real
executor module and, for the jobs, the real runner against PostgreSQL.

* a claimed job runs in the waiting executor (its ``executor_started`` event says ``prestarted``), which ends with
  it: the next job gets a fresh one unless the worker started another meanwhile;
* a job whose inputs cannot be linked into the waiting executor runs in a fresh one, with the same result;
* a waiting executor cannot change or add inputs, and its wall clock starts with its job, not before.
"""

from __future__ import annotations

import dataclasses
import errno
import sys
import time

import pytest
from sqlalchemy import select

from tests.support.wait import wait_until


@pytest.fixture(autouse=True)
def _bubblewrap():
    from app import sandbox

    if not sandbox.bwrap_works():  # `make test` installs it; CI=true requires it (tests/integration/test_sandbox_e2e)
        pytest.skip("executors are started ahead under bubblewrap only (worker/prestart.py)")


def _settings(**changes):
    from app.settings import get_settings

    return get_settings().model_copy(update=changes)


def _started(job_id: str) -> dict:
    from app.db.models import JobEvent
    from app.db.session import session_scope

    with session_scope() as s:
        return s.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "executor_started")
                         ).one()


@pytest.fixture()
def fresh_prestart():
    from worker import prestart

    prestart.shutdown()
    yield prestart
    prestart.shutdown()


@pytest.mark.postgres
def test_a_job_runs_in_the_waiting_executor_which_ends_with_it(client, make_key, uploaded, fresh_prestart):
    from tests.support.jobs import job_body
    from worker import runner

    h = make_key("prestart")
    m, d = uploaded(h)
    first, second = (client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()["id"] for _ in range(2))
    settings = _settings()
    fresh_prestart.prepare(settings)
    waiting = fresh_prestart._waiting
    assert waiting is not None and waiting.scratch.is_dir()
    assert runner.run_job(first, settings) == "succeeded"
    assert _started(first)["prestarted"] is True
    assert waiting.ex.proc.returncode == 0 and not waiting.scratch.exists()  # it ended with its job
    assert fresh_prestart._waiting is None  # never handed to a second job
    assert runner.run_job(second, settings) == "succeeded"
    assert _started(second)["prestarted"] is False


@pytest.mark.postgres
def test_inputs_that_cannot_be_linked_get_a_fresh_executor(client, make_key, uploaded, fresh_prestart, monkeypatch):
    from app import sandbox
    from tests.support.jobs import job_body
    from worker import runner

    h = make_key("prestart-exdev")
    m, d = uploaded(h)
    job_id = client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()["id"]
    settings = _settings()
    fresh_prestart.prepare(settings)
    waiting = fresh_prestart._waiting

    def cross_device(self, inputs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(sandbox.Executor, "place_inputs", cross_device)
    assert runner.run_job(job_id, settings) == "succeeded"
    assert _started(job_id)["prestarted"] is False
    assert waiting.ex.proc.returncode is not None  # killed, not left behind


_TAMPER = r"""
import json, os, sys
name = sys.stdin.readline().strip()
tries = {}
for what, act in (("write", lambda: open("inputs/teacher", "ab").write(b"x")),
                  ("chmod", lambda: os.chmod("inputs/teacher", 0o666)),
                  ("add", lambda: open("inputs/extra", "wb").write(b"x")),
                  ("remove", lambda: os.unlink("inputs/teacher"))):
    try:
        act()
        tries[what] = "done"
    except OSError as exc:
        tries[what] = exc.strerror
tries["read"] = open("inputs/teacher", "rb").read().decode()
tries["job"] = open(name).read()
print(json.dumps(tries), flush=True)
"""


def _limits(**changes):
    from worker.supervisor import job_limits

    return dataclasses.replace(job_limits(_settings()), **changes)


def test_a_waiting_executor_cannot_change_its_inputs(tmp_path):
    import json

    from app import sandbox

    mode = "bwrap"
    original = tmp_path / "cache" / "teacher.bin"
    original.parent.mkdir()
    original.write_bytes(b"teacher")
    mode_before = original.stat().st_mode
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ex = sandbox.spawn([sys.executable, "-c", _TAMPER], scratch=scratch, inputs={}, limits=_limits(), mode=mode,
                       waiting=True)
    (scratch / "job.json").write_text("the job")
    ex.place_inputs({"teacher": original})
    ex.begin("job.json")
    lines = list(ex.lines())
    assert ex.wait().returncode == 0
    seen = json.loads(lines[-1])
    assert seen["read"] == "teacher" and seen["job"] == "the job", seen
    assert original.read_bytes() == b"teacher" and original.stat().st_mode == mode_before, seen
    # The inputs directory is read-only inside the sandbox: nothing changes there at all.
    assert {seen[k] for k in ("write", "chmod", "add", "remove")} == {"Read-only file system"}, seen


def test_a_waiting_executors_wall_clock_starts_with_its_job(tmp_path):
    from app import sandbox

    ex = sandbox.spawn([sys.executable, "-c", "import sys, time; sys.stdin.readline(); time.sleep(30)"],
                       scratch=tmp_path, inputs={}, limits=_limits(wall_seconds=0.5), mode="bwrap",
                       waiting=True)
    try:
        time.sleep(1.5)  # three wall limits' worth of waiting: not counted
        assert ex.proc.poll() is None
        began = time.monotonic()
        ex.begin("job.json")
        outcome = ex.wait(timeout=20)
        assert outcome.limit == "wall_time" and 0.4 < time.monotonic() - began < 10, outcome
    finally:
        ex.kill("test")
        wait_until(lambda: ex.proc.poll() is not None, 10, "the executor to end")
