"""Engine and session factory (one per process, built from settings), and the API's per-request session.

Why a request can never deadlock on the pool
--------------------------------------------
Sync routes run in anyio's thread pool, and one FastAPI request hops into it several times (sync
dependencies, the route, response validation). A request that has run a query keeps its pooled
connection across those hops. When more requests were in flight than the pool had connections, every
thread ended up blocked in the pool waiting for a connection held by a request that was itself waiting
for a thread to go on: 3.5 rps at 64 clients, none at 256, and a SIGTERM that never finished.

:func:`request_session` therefore admits at most ``DISTILLERY_DB_POOL_SIZE`` requests to hold a session
at once, and the pool keeps exactly that many connections (plus ``DISTILLERY_DB_POOL_OVERFLOW`` for work
outside requests: event-stream polls, sweeps, readiness checks). An admitted request always finds a
connection at once, so no thread ever waits on the pool: threads are only ever busy doing work, and a
request that waits for one holds a connection only until a busy thread finishes. Requests beyond the
limit wait for admission on the event loop, holding neither a thread nor a connection, first come first
served, for at most ``DISTILLERY_DB_POOL_TIMEOUT_SECONDS``; then they answer 503 ``database_unavailable``
with ``Retry-After`` (so does the pool, with the same timeout, should the overflow ever run out).

Opening a session does no I/O: the connection is taken at the first query. Closing one that still holds
a connection (a read leaves its transaction open) is a ROLLBACK round trip, so it runs in a thread, drawn
from a limiter of its own as large as the admissions: it never queues behind the threads new requests
need, and a database that hangs never blocks the event loop. A session that holds none (it committed)
closes in place.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import lru_cache
from typing import Any

import anyio
from anyio.lowlevel import RunVar
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.errors import DatabaseUnavailable
from app.settings import get_settings

log = logging.getLogger("distillery.db")
#: Milliseconds after which PostgreSQL ends this process's sessions that sit idle inside a transaction (see
#: :func:`end_idle_transactions`); None: never (the API's default).
_idle_transaction_ms: int | None = None


def end_idle_transactions(seconds: float) -> None:
    """Make PostgreSQL end this process's sessions that stay idle inside a transaction for ``seconds`` (its
    ``idle_in_transaction_session_timeout``; 0 turns it off). Worker processes call it at start.

    Why: a process stopped between a write and its COMMIT (SIGSTOP, a paused VM, a host swapping) keeps its
    row locks for as long as it stays stopped, and the server cannot tell it from a slow client. Every other
    worker that touches those rows then waits on it: a frozen worker caught mid-heartbeat blocked the reaper
    on its own job's row, and a leader caught mid-renewal blocked every worker from taking the lead, so
    nothing was requeued until the frozen process woke. With the timeout the server ends such a session and
    its locks go with it; the woken process finds its connection closed, and its next write is fenced out
    like any stale attempt's. Worker transactions are short by design (no download, no training, no upload
    inside one), so a healthy worker never comes near the limit."""
    global _idle_transaction_ms
    wanted = int(seconds * 1000) if seconds > 0 else None
    if wanted != _idle_transaction_ms:
        _idle_transaction_ms = wanted
        reset_engine()  # built before: the next session gets an engine with the setting


def reset_engine() -> None:
    """Close this process's engine, if built; the next session builds one from the current settings."""
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``. PostgreSQL gets a connect timeout and, unless ``poolclass`` is given, the pool
    :func:`request_session` is sized against (``DISTILLERY_DB_POOL_*``), pinged before each use so a
    restarted database costs no request an error."""
    if url.startswith("sqlite"):
        # The API and the worker are separate processes writing one file: WAL lets readers proceed
        # during a write and busy_timeout makes a writer wait instead of failing with "locked".
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    settings = get_settings()
    if url.startswith("postgresql"):
        # A database that accepts TCP but never answers (stopped, overloaded) must not hang a connect forever.
        connect_args = {"connect_timeout": settings.db_connect_timeout_seconds}
        if _idle_transaction_ms is not None:
            connect_args["options"] = f"-c idle_in_transaction_session_timeout={_idle_transaction_ms}"
        kwargs["connect_args"] = {**connect_args, **kwargs.get("connect_args", {})}
    if kwargs.get("poolclass") is None:
        kwargs = {"pool_pre_ping": True, "pool_size": settings.db_pool_size,
                  "max_overflow": settings.db_pool_overflow, "pool_timeout": settings.db_pool_timeout_seconds,
                  **kwargs}
    return create_engine(url, **kwargs)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().resolved_database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A unit of work: commits once at the end, rolls back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# Per event loop (uvicorn runs one; each TestClient its own): anyio primitives belong to the loop that made them.
_admission: RunVar[anyio.Semaphore] = RunVar("distillery_db_admission")
_closers: RunVar[anyio.CapacityLimiter] = RunVar("distillery_db_closers")


def _loop_primitives() -> tuple[anyio.Semaphore, anyio.CapacityLimiter]:
    try:
        return _admission.get(), _closers.get()
    except LookupError:
        size = get_settings().db_pool_size
        admission, closers = anyio.Semaphore(size, fast_acquire=True), anyio.CapacityLimiter(size)
        _admission.set(admission)
        _closers.set(closers)
        return admission, closers


def _close(session: Session) -> None:
    try:
        session.close()
    except Exception as exc:  # the connection died with the database; drop it, the pool opens a new one
        log.warning("closing a session failed (%s); its connection is discarded", type(exc).__name__)
        session.invalidate()


@asynccontextmanager
async def request_session() -> AsyncIterator[Session]:
    """One request's session, admitted against the pool (see the module docstring). Waiting for admission
    longer than ``DISTILLERY_DB_POOL_TIMEOUT_SECONDS`` raises :class:`DatabaseUnavailable` (503)."""
    admission, closers = _loop_primitives()
    timeout = get_settings().db_pool_timeout_seconds
    try:
        with anyio.fail_after(timeout):
            await admission.acquire()
    except TimeoutError:
        log.warning("no database session within %.1f s: all %d are in use", timeout, get_settings().db_pool_size)
        raise DatabaseUnavailable("every database connection is busy; retry shortly", retry_after=1) from None
    try:
        session = get_sessionmaker()()
        try:
            yield session
        finally:
            with anyio.CancelScope(shield=True):
                if session.in_transaction():  # may hold a connection: the rollback is I/O
                    await anyio.to_thread.run_sync(_close, session, limiter=closers)
                else:
                    session.close()
    finally:
        admission.release()
