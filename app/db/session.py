"""Engine and session factory. One per process, built from settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.settings import get_settings


#: Threads the API runs sync routes on (anyio's default limiter, 40): the pool allows as many connections.
REQUEST_THREADS = 40


def make_engine(url: str, **kwargs) -> Engine:
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
    if kwargs.get("poolclass") is None:
        # As many connections as threads that can hold one (the API's request threads, REQUEST_THREADS, plus
        # the worker's few), so no thread ever waits on the pool for a connection held by a request that is
        # itself waiting for a thread; a short timeout turns real exhaustion into 503, never a hang.
        kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=REQUEST_THREADS, pool_timeout=10)
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
