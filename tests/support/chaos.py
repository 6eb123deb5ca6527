"""Chaos-suite helpers: throwaway Redis and PostgreSQL servers the tests may break, a whole Distillery stack
(API + workers as real processes on their own database, data dir and queue), process-tree freezing, and
polling with deadlines.

Nothing here touches the shared PostgreSQL (5432) or Redis (6379) beyond creating and dropping one database
per stack: the servers a test stops, hangs or flushes are always ones it started itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support import services
from tests.support.services import free_port
from tests.support.fixtures import ROOT, start_process, stop_process, wait_for_log
from tests.support.flow import wait_http
from tests.support.wait import wait_until

TERMINAL = ("succeeded", "failed", "cancelled")


# ---- process trees -------------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_groups(pid: int) -> set[int]:
    """The process groups of ``pid`` and all its descendants (a worker's executors run in groups of their own)."""
    kids, groups, todo = _children(), set(), [pid]
    while todo:
        p = todo.pop()
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            continue
        todo.extend(kids.get(p, []))
    return groups


def signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to every process group of ``proc``'s tree (SIGSTOP: the whole worker, executors included)."""
    for group in process_groups(proc.pid):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass


# ---- servers a test may break --------------------------------------------------------------------------
@dataclass
class Redis:
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 3):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)

    def hang(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


@contextmanager
def throwaway_redis(log_dir: Path) -> Iterator[Redis]:
    """A private ``redis-server`` without persistence on a free port, killed at the end."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=open(log_dir / f"redis-{port}.log", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    server = Redis(port, proc)
    try:
        wait_until(lambda: _redis_ping(server), 15, "the throwaway redis-server to answer")
        yield server
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


def _redis_ping(server: Redis) -> bool:
    try:
        return bool(server.client(timeout=0.5).ping())
    except Exception:
        return False


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not candidates:
        raise RuntimeError(f"{name} not found (install PostgreSQL server binaries)")
    return str(candidates[-1])


@dataclass
class Postgres:
    """A private PostgreSQL cluster (trust auth, no fsync) that a test may stop and start again."""

    dir: Path
    port: int
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/distillery"

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, _pg_bin("pg_ctl"), "-D", str(self.dir / "data"), *args],
                              capture_output=True, text=True, timeout=60, check=check)

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._ctl("-o", opts, "-l", str(self.dir / "postgres.log"), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "-t", "30", "stop")


@contextmanager
def throwaway_postgres() -> Iterator[Postgres]:
    """initdb + pg_ctl on a free port with its socket in a private dir; as the ``postgres`` user when we are
    root (initdb refuses root). Database ``distillery`` exists; the cluster is removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="distillery-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    pg = Postgres(root, free_port(), as_user)
    try:
        subprocess.run([*as_user, _pg_bin("initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres",
                        "--no-sync", "-E", "UTF8"], capture_output=True, check=True, timeout=120)
        pg.start()
        subprocess.run([*as_user, _pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
                        "distillery"], capture_output=True, check=True, timeout=30)
        yield pg
    finally:
        pg._ctl("-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


# ---- a Distillery stack --------------------------------------------------------------------------------
@dataclass
class Api:
    proc: subprocess.Popen
    url: str
    log: Path


@dataclass
class Stack:
    """Real ``distillery serve`` / ``distillery worker`` processes on ``database_url`` (migrated by
    :meth:`migrate`), ``broker_url``, a data dir and a queue of their own. The test inspects the database
    directly (its own engine) and talks to the API over HTTP."""

    root: Path
    database_url: str
    broker_url: str
    extra_env: dict[str, str] = field(default_factory=dict)
    queue: str = field(default_factory=lambda: f"chaos-{uuid.uuid4().hex[:8]}")
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.data_dir = self.root / "data"
        self.engine = create_engine(self.database_url, poolclass=NullPool, connect_args={"connect_timeout": 2})

    @property
    def env(self) -> dict[str, str]:
        return {"DISTILLERY_DATABASE_URL": self.database_url, "DISTILLERY_BROKER_URL": self.broker_url,
                "DISTILLERY_DATA_DIR": str(self.data_dir), "DISTILLERY_JOB_QUEUE": self.queue,
                "DISTILLERY_WORKER_QUEUES": self.queue, **self.extra_env}

    def migrate(self) -> None:
        subprocess.run([sys.executable, "-m", "app.cli", "migrate"], cwd=ROOT, env={**os.environ, **self.env},
                       check=True, capture_output=True, timeout=120)

    def key(self, tenant: str) -> dict[str, str]:
        out = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--tenant", tenant], cwd=ROOT,
                             env={**os.environ, **self.env}, check=True, capture_output=True, text=True, timeout=120)
        return {"Authorization": f"Bearer {out.stdout.strip().splitlines()[-1]}"}

    def api(self, name: str = "api", port: int | None = None) -> Api:
        port = port or free_port()
        log = self.root / f"{name}.log"
        proc = start_process([sys.executable, "-m", "app.cli", "serve"], log,
                             env={**self.env, "DISTILLERY_PORT": str(port)})
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_http(url, timeout=60)
        return Api(proc, url, log)

    def worker(self, name: str, wait: bool = True, **env: str) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        proc = start_process([sys.executable, "-m", "app.cli", "worker"], log, env={**self.env, **env})
        self.procs.append(proc)
        if wait:
            self.wait_ready(proc, name)
        return proc

    def wait_ready(self, proc: subprocess.Popen, name: str) -> None:
        wait_for_log(proc, self.log(name), "ready.", timeout=90)

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def log_text(self, name: str) -> str:
        return self.log(name).read_text(errors="replace")

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                signal_tree(proc, signal.SIGCONT)
                stop_process(proc, timeout=20)
        self.engine.dispose()

    # ---- what the database says -----------------------------------------------------------------------
    def _rows(self, sql: str, **params) -> list:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    def jobs(self, ids: list[str]) -> dict[str, dict]:
        """Status, attempts, progress, error and events (types in order, with data) of each job."""
        if not ids:
            return {}
        rows = self._rows("SELECT id, status, attempts, progress, error_code, error_message, lease_expires_at "
                          "FROM jobs WHERE id = ANY(:ids)", ids=list(ids))
        events = self._rows("SELECT job_id, type, data, created_at FROM job_events WHERE job_id = ANY(:ids) "
                            "ORDER BY job_id, seq", ids=list(ids))
        out = {r.id: {"status": r.status, "attempts": r.attempts, "progress": _json(r.progress) or {},
                      "error": (r.error_code, r.error_message), "lease_expires_at": r.lease_expires_at,
                      "events": [], "event_data": []} for r in rows}
        for e in events:
            out[e.job_id]["events"].append(e.type)
            out[e.job_id]["event_data"].append((e.type, _json(e.data) or {}, e.created_at))
        return out

    def job(self, job_id: str) -> dict:
        return self.jobs([job_id])[job_id]

    def statuses(self, ids: list[str]) -> dict[str, str]:
        return {r.id: r.status for r in self._rows("SELECT id, status FROM jobs WHERE id = ANY(:ids)", ids=list(ids))}

    def all_jobs(self) -> list[str]:
        return [r.id for r in self._rows("SELECT id FROM jobs ORDER BY created_at")]


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@contextmanager
def stack_on_shared_postgres(root: Path, broker_url: str, **env: str) -> Iterator[Stack]:
    """A migrated stack on a fresh database of the shared PostgreSQL (dropped at the end)."""
    url = services.create_database()
    assert url, "PostgreSQL is not reachable"
    stack = Stack(root, url, broker_url, dict(env))
    try:
        stack.migrate()
        yield stack
    finally:
        stack.close()
        services.drop_database(url)


# ---- clients -------------------------------------------------------------------------------------------
def upload_inputs(api: Api, headers: dict[str, str], teacher: Path, dataset_npz: bytes) -> tuple[str, str]:
    with httpx.Client(base_url=api.url, headers=headers, timeout=120) as c:
        m = c.post("/v1/models", files={"file": ("teacher.pt", teacher.read_bytes())}, data={"name": "teacher"})
        d = c.post("/v1/datasets", files={"file": ("d.npz", dataset_npz)}, data={"name": "data", "format": "npz"})
    assert m.status_code == 201 and d.status_code == 201, (m.text, d.text)
    return m.json()["id"], d.json()["id"]


def submit_many(api: Api, headers: dict[str, str], bodies: list[dict], threads: int = 8) -> list[str]:
    """POST every body (in parallel); returns the job ids in order."""
    ids: list[str | None] = [None] * len(bodies)
    errors: list[str] = []

    def post(chunk: list[int]) -> None:
        with httpx.Client(base_url=api.url, headers=headers, timeout=60) as c:
            for i in chunk:
                r = c.post("/v1/jobs", json=bodies[i])
                if r.status_code != 202:
                    errors.append(f"{r.status_code} {r.text[:300]}")
                else:
                    ids[i] = r.json()["id"]

    chunks = [list(range(len(bodies)))[k::threads] for k in range(threads)]
    workers = [threading.Thread(target=post, args=(c,)) for c in chunks if c]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors, errors[:5]
    return [i for i in ids if i is not None]


def assert_each_ran_once(jobs: dict[str, dict], attempts: int = 1) -> None:
    """Every job succeeded, with ``attempts`` attempts, one 'started' event per attempt and one 'succeeded'."""
    bad = {j: (v["status"], v["attempts"], v["events"].count("started"), v["error"]) for j, v in jobs.items()
           if v["status"] != "succeeded" or v["attempts"] != attempts or v["events"].count("started") != attempts
           or v["events"].count("succeeded") != 1 or v["events"][-1] != "succeeded"}
    assert not bad, bad
