"""Rendered ``GET /v1/jobs/{id}`` bodies, kept until PostgreSQL says the job's row changed.

Polling one job is what clients do most (a platform watching 64 jobs at once polls 64 of them); the row
changes a few times a minute (progress, heartbeats), so nearly every poll would render what the previous
one did. Each API process keeps the JSON it rendered, per job, and drops it when the row changes:

* A trigger on ``jobs`` (migration 0005) sends ``NOTIFY distillery_jobs, '<job id>'`` on every UPDATE or
  DELETE, whichever process commits it (a worker's heartbeat, the reaper, another API process), and
  PostgreSQL delivers it when that transaction commits.
* :class:`ChangeListener`, a thread with a connection of its own, LISTENs and invalidates. The cache
  answers only while that connection is up and listening: when it drops (database restart, network), the
  cache is emptied and disabled until the listener is back, so a change that happened while nobody listened
  is never missed. Every request then reads the database, as without a cache.
* A read that started before an invalidation must not store what it read: :attr:`JobCache.epoch` is taken
  before the query and :meth:`JobCache.put` discards the body if any invalidation happened since.

A hit is answered by :class:`CachedJobReads` before routing (a key verified a moment ago, a cached job of
that key's tenant); everything else takes the route, which fills the cache.

A change is visible to readers once the notification arrives (well under a millisecond after the commit on
one host; ``tests/api/test_job_cache.py`` measures it). SQLite has no LISTEN: with it the cache stays off.
``DISTILLERY_JOB_CACHE_SIZE`` bounds the jobs one process remembers (0 turns the cache off).
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections import OrderedDict
from types import SimpleNamespace

import psycopg
from sqlalchemy.engine import make_url
from starlette.types import ASGIApp, Receive, Scope, Send

from app.auth import cached_principal
from app.errors import Unauthorized
from app.settings import Settings, get_settings

log = logging.getLogger("distillery.job_cache")
CHANNEL = "distillery_jobs"
JOBS_PREFIX = "/v1/jobs/"  # GET JOBS_PREFIX + <id> is the read the cache answers
PING_SECONDS = 5.0  # the listener checks its connection this often when no notification comes
RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0)  # reconnect backoff; the last value repeats


class JobCache:
    """An LRU map job id → (tenant id, rendered body). Thread-safe: the listener invalidates from its thread."""

    def __init__(self, size: int):
        self.size = size
        self.enabled = False
        self.epoch = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tenant_id: str, job_id: str) -> bytes | None:
        """The body cached for ``job_id`` if it belongs to ``tenant_id`` (another tenant reads the database,
        which answers 404 as it always did)."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(job_id)
            if entry is None or entry[0] != tenant_id:
                self.misses += 1
                return None
            self._entries.move_to_end(job_id)
            self.hits += 1
            return entry[1]

    def put(self, epoch: int, tenant_id: str, job_id: str, body: bytes) -> None:
        """Remember ``body``, read from the database after :attr:`epoch` was ``epoch``, unless anything was
        invalidated since (the read may predate that change)."""
        with self._lock:
            if not self.enabled or epoch != self.epoch:
                return
            self._entries[job_id] = (tenant_id, body)
            self._entries.move_to_end(job_id)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def invalidate(self, job_id: str) -> None:
        with self._lock:
            self.epoch += 1
            self._entries.pop(job_id, None)

    def reset(self, enabled: bool) -> None:
        """Forget everything; answer from now on only if ``enabled`` (the listener is connected)."""
        with self._lock:
            self.epoch += 1
            self._entries.clear()
            self.enabled = enabled and self.size > 0


def libpq_dsn(database_url: str) -> str:
    """The SQLAlchemy URL of a PostgreSQL database (``postgresql+psycopg://…``) as a libpq URI."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener(threading.Thread):
    """LISTEN on :data:`CHANNEL` and invalidate ``cache``; the cache answers only while this is connected.

    The connection uses TCP keepalives and a user timeout, and is pinged every :data:`PING_SECONDS`, so a
    database that vanished without closing the socket disables the cache within seconds."""

    def __init__(self, cache: JobCache, dsn: str, connect_timeout: int):
        super().__init__(name="distillery-job-cache", daemon=True)
        self.cache, self.dsn, self.connect_timeout = cache, dsn, connect_timeout
        self.connected = threading.Event()
        self.connects = 0  # how many times it has started listening (a reconnect adds one)
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # stop() wakes the select at once

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        os.write(self._wake_w, b"x")
        self.join(timeout)
        if not self.is_alive():  # a thread still in a connect keeps its pipe; it is a daemon
            os.close(self._wake_r)
            os.close(self._wake_w)

    def run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout,
                                     keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=2,
                                     tcp_user_timeout=int(PING_SECONDS * 1000),
                                     application_name="distillery-job-cache") as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.cache.reset(enabled=True)  # listening from here on: no change can be missed
                    self.connected.set()
                    self.connects += 1
                    if failures:
                        log.info("job cache listener reconnected; the cache answers again")
                    failures = 0
                    self._listen(conn)
            except psycopg.Error as exc:
                failures += 1
                if self.connected.is_set() or failures == 1:
                    log.warning("job cache listener lost its connection (%s); reads go to the database "
                                "until it is back", type(exc).__name__)
            finally:
                self.connected.clear()
                self.cache.reset(enabled=False)
            if failures:
                self._stopping.wait(RETRY_SECONDS[min(failures, len(RETRY_SECONDS)) - 1])

    def _listen(self, conn: psycopg.Connection) -> None:
        sock = conn.pgconn.socket
        while not self._stopping.is_set():
            readable, _, _ = select.select([sock, self._wake_r], [], [], PING_SECONDS)
            if self._wake_r in readable:
                return
            if not readable:
                conn.execute("SELECT 1")  # quiet for a while: a dead connection raises rather than waits
            # What arrived, and what psycopg kept aside during the ping. A closed socket raises here.
            for note in conn.notifies(timeout=0):
                self.cache.invalidate(note.payload)
            if conn.closed or conn.broken:
                raise psycopg.OperationalError("the listener's connection closed")


class CachedJobReads:
    """ASGI middleware: a ``GET /v1/jobs/{id}`` whose key was verified a moment ago and whose job is cached is
    answered here, before routing — the poll a platform sends most costs a dict lookup, not a pass through the
    framework. Anything else (another path, a method, a key not in the key cache, a job not cached or of
    another tenant, a malformed header) goes on to the route unchanged, which answers as it always does."""

    ROUTE = SimpleNamespace(path="/v1/jobs/{job_id}")  # what the request counters see (app/api/telemetry.py)

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and (body := self._cached(scope)) is not None:
            scope["route"] = self.ROUTE
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _cached(scope: Scope) -> bytes | None:
        path: str = scope["path"]
        if not path.startswith(JOBS_PREFIX) or "/" in (job_id := path[len(JOBS_PREFIX):]) or not job_id:
            return None
        cache = get_cache()
        if not cache.enabled:
            return None
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if authorization is None:
            return None
        try:
            principal = cached_principal(authorization.decode("latin-1"))
        except Unauthorized:
            return None  # the route answers the 401
        return None if principal is None else cache.get(principal.tenant_id, job_id)


_cache: JobCache | None = None


def get_cache() -> JobCache:
    """This process's cache (disabled until :func:`start_listener` connects)."""
    global _cache
    if _cache is None:
        _cache = JobCache(get_settings().job_cache_size)
    return _cache


def start_listener(settings: Settings) -> ChangeListener | None:
    """Start the listener for this process when the database is PostgreSQL and the cache is on."""
    url = settings.resolved_database_url
    if settings.job_cache_size <= 0 or not url.startswith("postgresql"):
        return None
    listener = ChangeListener(get_cache(), libpq_dsn(url), settings.db_connect_timeout_seconds)
    listener.start()
    return listener
