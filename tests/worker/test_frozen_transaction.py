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

from tests.support import services
from tests.support.wait import wait_until

# Row locks, and a session the server ends: PostgreSQL's behaviour. On a database of this module's own, so no
# real worker's reaper (the session's Celery worker) races this test's for the jobs, nor this test's for theirs.
pytestmark = pytest.mark.postgres

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


@pytest.fixture(scope="module")
def own_db():
    """(url, sessionmaker) of a migrated database of this module's own on the local PostgreSQL."""
    from sqlalchemy.orm import sessionmaker
    from sqlalchemy.pool import NullPool

    from app.db.session import make_engine

    url = services.create_database()
    engine = make_engine(url, poolclass=NullPool)
    try:
        subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env={**os.environ, "DISTILLERY_DATABASE_URL": url},
                       check=True, capture_output=True, timeout=120, cwd=Path(__file__).parents[2])
        yield url, sessionmaker(engine, expire_on_commit=False)
    finally:
        engine.dispose()
        services.drop_database(url)


def _jobs(sessions, n: int, lease_name: str) -> list[str]:
    """``n`` jobs running on a worker whose lease ran out, and an expired leader row ``lease_name``."""
    from app.clock import utcnow
    from app.db.models import Job, LeaderLease, Tenant

    past, tenant = utcnow() - timedelta(minutes=1), "ten_" + secrets.token_hex(6)
    ids = [f"job_{secrets.token_hex(8)}" for _ in range(n)]
    with sessions.begin() as s:
        s.add(Tenant(id=tenant, name=tenant))
        s.flush()
        s.add_all(Job(id=i, tenant_id=tenant, status="running", kind="distill", spec={}, queue="parked", attempts=1,
                      worker_id="frozen", lease_token=secrets.token_hex(8), lease_expires_at=past) for i in ids)
        s.add(LeaderLease(name=lease_name, holder="frozen", token="x", expires_at=past))
    return ids


def _freeze(url: str, job_id: str, lease_name: str, idle_seconds: float) -> subprocess.Popen:
    env = {**os.environ, "DISTILLERY_DATABASE_URL": url, "DISTILLERY_DB_IDLE_TRANSACTION_SECONDS": str(idle_seconds)}
    proc = subprocess.Popen([sys.executable, "-c", _FREEZE, job_id, lease_name], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[2])
    assert proc.stdout.readline().strip() == "locked", proc.communicate(timeout=30)
    wait_until(lambda: _state(proc.pid) == "T", 10, "the child to stop itself")
    return proc


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _reap(sessions) -> dict[str, int]:
    from app.clock import utcnow
    from app.jobs.reaper import reap

    with sessions.begin() as s:
        s.execute(text("SET LOCAL lock_timeout = '5s'"))  # a reaper that blocks fails this test instead of hanging it
        return reap(s, utcnow())


def _take_lead(sessions, lease_name: str) -> bool:
    """Leadership's take (worker/dispatcher.py): one conditional UPDATE of an expired leader row."""
    with sessions.begin() as s:
        s.execute(text("SET LOCAL lock_timeout = '5s'"))
        return s.execute(text("UPDATE leader_leases SET holder = 'other' WHERE name = :n AND expires_at < now()"),
                         {"n": lease_name}).rowcount == 1


def _statuses(sessions, job_ids: list[str]) -> dict[str, str]:
    with sessions.begin() as s:
        return dict(s.execute(text("SELECT id, status FROM jobs WHERE id = ANY(:ids)"), {"ids": job_ids}).all())


def test_a_worker_stopped_inside_a_transaction_loses_its_locks(own_db):
    url, sessions = own_db
    lease_name = "test-" + secrets.token_hex(4)
    [job_id] = _jobs(sessions, 1, lease_name)
    proc = _freeze(url, job_id, lease_name, idle_seconds=1)
    froze = time.monotonic()
    try:
        requeued = wait_until(lambda: _reap(sessions)["requeued"] == 1, 15,
                              "the reaper to requeue the frozen worker's job")
        assert _take_lead(sessions, lease_name)  # the leader row is free too
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "committed" not in out and "idle-in-transaction" in err, (out, err[-2000:])
    assert _statuses(sessions, [job_id])[job_id] == "queued"
    print(f"job requeued {requeued:.1f} s after the worker stopped mid-transaction "
          f"(idle-transaction limit 1 s; {time.monotonic() - froze:.1f} s in all)")


def test_without_the_limit_a_stopped_transaction_holds_only_its_own_row(own_db):
    url, sessions = own_db
    lease_name = "test-" + secrets.token_hex(4)
    held, other = _jobs(sessions, 2, lease_name)
    proc = _freeze(url, held, lease_name, idle_seconds=0)
    try:
        # The other job goes at once: the locked row is skipped, not waited for (_reap's lock_timeout).
        assert _reap(sessions)["requeued"] == 1
        assert _statuses(sessions, [held, other]) == {held: "running", other: "queued"}
        time.sleep(1.5)  # past the 1 s the first test's limit needed: without one, nothing ends the session
        assert _reap(sessions)["requeued"] == 0 and _statuses(sessions, [held])[held] == "running"
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "committed" in out, err[-2000:]
    assert _reap(sessions)["requeued"] == 1 and _statuses(sessions, [held])[held] == "queued"  # released, it goes
