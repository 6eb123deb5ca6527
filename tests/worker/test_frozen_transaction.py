"""A worker stopped (SIGSTOP) between a write and its COMMIT, against PostgreSQL: a real child process that sets up
its database sessions as a worker does (``import worker.celery_app``), locks a job's row and the leader row inside
one transaction, and stops itself there.

* With the worker's ``DISTILLERY_DB_IDLE_TRANSACTION_SECONDS`` the server ends its session: the reaper requeues the
  job, another process takes the lead, and the woken process finds its transaction gone (it writes nothing).
* Without it (0) the locks stay for as long as the process stays stopped; the reaper skips that one row
  (``SKIP LOCKED``) and still requeues every other expired job.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.support.wait import wait_until

pytestmark = pytest.mark.postgres  # row locks, and a session the server ends: PostgreSQL's behaviour

_FREEZE = """
import os, signal, sys
import worker.celery_app  # noqa: F401  (the worker's process set-up, as `distillery worker` runs it)
from sqlalchemy import text
from app.db.session import session_scope
with session_scope() as s:
    s.execute(text("UPDATE jobs SET heartbeat_at = now() WHERE id = :id"), {"id": sys.argv[1]})
    s.execute(text("UPDATE leader_leases SET holder = 'frozen' WHERE name = :n"), {"n": sys.argv[2]})
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # stopped mid-transaction, its locks held
print("committed", flush=True)
"""


def _expire(job_ids: list[str], lease_name: str) -> None:
    """The jobs run on a worker whose lease ran out; the leader row ``lease_name`` is expired too."""
    from app.clock import utcnow
    from app.db.session import session_scope

    past = utcnow() - timedelta(minutes=1)
    with session_scope() as s:
        s.execute(text("UPDATE jobs SET status = 'running', attempts = 1, worker_id = 'frozen', lease_token = :t, "
                       "lease_expires_at = :past WHERE id = ANY(:ids)"),
                  {"t": secrets.token_hex(8), "past": past, "ids": job_ids})
        s.execute(text("INSERT INTO leader_leases (name, holder, token, expires_at) VALUES (:n, 'frozen', 'x', :past)"),
                  {"n": lease_name, "past": past})


def _freeze(backend, job_id: str, lease_name: str, idle_seconds: float) -> subprocess.Popen:
    env = {**os.environ, **backend.env, "DISTILLERY_DB_IDLE_TRANSACTION_SECONDS": str(idle_seconds)}
    proc = subprocess.Popen([sys.executable, "-c", _FREEZE, job_id, lease_name], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[2])
    assert proc.stdout.readline().strip() == "locked", proc.communicate(timeout=30)
    wait_until(lambda: _state(proc.pid) == "T", 10, "the child to stop itself")
    return proc


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _reap() -> dict[str, int]:
    from app.clock import utcnow
    from app.db.session import session_scope
    from app.jobs.reaper import reap

    with session_scope() as s:
        s.execute(text("SET LOCAL lock_timeout = '5s'"))  # a reaper that blocks fails this test instead of hanging it
        return reap(s, utcnow())


def _statuses(job_ids: list[str]) -> dict[str, str]:
    from app.db.session import session_scope

    with session_scope() as s:
        return dict(s.execute(text("SELECT id, status FROM jobs WHERE id = ANY(:ids)"), {"ids": job_ids}).all())


def test_a_worker_stopped_inside_a_transaction_loses_its_locks(client, make_key, uploaded, backend):
    from tests.support.jobs import job_body
    from worker.dispatcher import Leadership

    h = make_key("frozen-tx")
    m, d = uploaded(h)
    job_id = client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()["id"]
    lease_name = "test-" + secrets.token_hex(4)
    _expire([job_id], lease_name)
    proc = _freeze(backend, job_id, lease_name, idle_seconds=1)
    froze = time.monotonic()
    try:
        # (The session's real worker, if one runs on this database, may be the reaper that gets there first.)
        requeued = wait_until(lambda: _reap() is not None and _statuses([job_id])[job_id] == "queued", 15,
                              "the reaper to requeue the frozen worker's job")
        assert Leadership("other", name=lease_name).held()  # the leader row is free too
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "committed" not in out and "idle-in-transaction" in err, (out, err[-2000:])
    assert _statuses([job_id])[job_id] == "queued"
    print(f"job requeued {requeued:.1f} s after the worker stopped mid-transaction "
          f"(idle-transaction limit 1 s; {time.monotonic() - froze:.1f} s in all)")


def test_without_the_limit_a_stopped_transaction_holds_only_its_own_row(client, make_key, uploaded, backend):
    from tests.support.jobs import job_body

    h = make_key("frozen-tx-off")
    m, d = uploaded(h)
    held, other = (client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()["id"] for _ in range(2))
    lease_name = "test-" + secrets.token_hex(4)
    _expire([held, other], lease_name)
    proc = _freeze(backend, held, lease_name, idle_seconds=0)
    try:
        _reap()  # the other job goes at once: the locked row is skipped, not waited for (_reap's lock_timeout)
        wait_until(lambda: _statuses([other])[other] == "queued", 10, "the other job to be requeued", every=0.2)
        time.sleep(1.5)  # past the 1 s the first test's limit needed: without one, nothing ends the session
        _reap()
        assert _statuses([held, other]) == {held: "running", other: "queued"}
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "committed" in out, err[-2000:]
    wait_until(lambda: _reap() is not None and _statuses([held])[held] == "queued", 10, "the released job to go")
