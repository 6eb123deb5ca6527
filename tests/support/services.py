"""Find the PostgreSQL and Redis the integration tests need; skip (or fail under CI=true) when absent.

Nothing here runs at import: a test that needs neither server never connects to one."""

from __future__ import annotations

import os
import socket
import uuid
from urllib.parse import urlsplit

import pytest

PG_ADMIN_URL = os.environ.get("DISTILLERY_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DISTILLERY_TEST_REDIS", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_PG, _REDIS = urlsplit(PG_ADMIN_URL), urlsplit(REDIS_URL)
PG_HOST, PG_PORT = _PG.hostname or "127.0.0.1", _PG.port or 5432
REDIS_HOST, REDIS_PORT = _REDIS.hostname or "127.0.0.1", _REDIS.port or 6379


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require(name: str, host: str, port: int) -> None:
    """Skip with a message saying what to start, or fail loudly in CI (never skip silently there)."""
    if reachable(host, port):
        return
    msg = f"{name} is not reachable on {host}:{port}; start it to run the integration tests"
    if IN_CI:
        pytest.fail(f"CI=true: {msg}", pytrace=False)
    pytest.skip(msg)


def _admin_conninfo() -> str:
    user = _PG.username or "postgres"
    return f"host={PG_HOST} port={PG_PORT} user={user} dbname={_PG.path.lstrip('/') or 'postgres'}"


def create_database() -> str:
    """Create a throwaway database on the PostgreSQL of ``DISTILLERY_TEST_PG``; returns its SQLAlchemy URL."""
    import psycopg

    name = f"distillery_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{_PG.username or 'postgres'}@{PG_HOST}:{PG_PORT}/{name}"


def drop_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
