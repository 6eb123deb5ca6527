"""The database (and broker) a test runs against, switched in this process without re-reading settings.

Settings are read once per process (``app.settings.get_settings``), so the root conftest sets the embedded
default before anything imports ``app``: SQLite and the SQLite-backed queue in a temporary data directory.
Tests marked ``integration`` or ``postgres`` run on a throwaway PostgreSQL database with the local Redis as
broker, created the first time such a test runs (:func:`create_postgres`) and dropped at the end.

:func:`activate` points this process at one backend: the settings object's URLs and data dir, the cached
engine, session factory and Celery app, and the ``DISTILLERY_*`` variables that subprocesses
(``python -m app.cli ...``) inherit, so a child process always sees the database its parent test sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tests.support import services


#: The key the test deployment sends to served teachers (their test servers require it).
SERVED_TEACHER_KEY = "sk-test-deployment"


@dataclass(frozen=True)
class Backend:
    name: str  # "sqlite" or "postgres"
    database_url: str
    broker_url: str | None  # None: the SQLite-backed queue under data_dir
    data_dir: Path

    @property
    def env(self) -> dict[str, str]:
        """The ``DISTILLERY_*`` variables a subprocess needs to use this backend."""
        env = {"DISTILLERY_DATABASE_URL": self.database_url, "DISTILLERY_DATA_DIR": str(self.data_dir),
               # Served teachers the tests start on loopback (tests/support/openai_server.py).
               "DISTILLERY_TEACHER_ENDPOINT_HOSTS": "127.0.0.1",
               "DISTILLERY_TEACHER_ENDPOINT_API_KEY": SERVED_TEACHER_KEY}
        if self.broker_url:
            env["DISTILLERY_BROKER_URL"] = self.broker_url
        return env

    def key(self, tenant: str) -> dict[str, str]:
        """Authorization headers for a new API key of ``tenant`` in this backend's database (activates it)."""
        from app.auth import create_key
        from app.db.session import session_scope

        activate(self)
        with session_scope() as s:
            _row, key = create_key(s, tenant)
        return {"Authorization": f"Bearer {key}"}


_active: Backend | None = None


def active() -> Backend | None:
    return _active


def activate(backend: Backend) -> None:
    """Make ``backend`` the one this process (and the subprocesses it starts from now on) uses."""
    global _active
    if _active == backend:
        return
    from app import auth, queue
    from app.db import session
    from app.settings import get_settings

    session.reset_engine()
    queue.get_celery.cache_clear()
    auth._cache.clear()
    settings = get_settings()
    settings.database_url, settings.broker_url, settings.data_dir = (backend.database_url, backend.broker_url,
                                                                     backend.data_dir)
    backend.data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(backend.env)
    if not backend.broker_url:
        os.environ.pop("DISTILLERY_BROKER_URL", None)
    _active = backend


def migrate(backend: Backend) -> None:
    from app.cli import migrate as run_migrations

    activate(backend)
    run_migrations()


def sqlite(root: Path) -> Backend:
    data = root / "data"
    return Backend("sqlite", f"sqlite:///{data / 'distillery.db'}", None, data)


def create_postgres(root: Path) -> Backend:
    """A new database on the local PostgreSQL (skip, or fail under CI=true, when PostgreSQL or Redis is down)."""
    services.require("PostgreSQL", services.PG_HOST, services.PG_PORT)
    services.require("Redis", services.REDIS_HOST, services.REDIS_PORT)
    url = services.create_database()
    return Backend("postgres", url, services.REDIS_URL, root / "pg-data")


def drop(backend: Backend) -> None:
    """Dispose of this process's connections to ``backend`` and drop its database (PostgreSQL only)."""
    if _active == backend:
        from app.db.session import get_engine

        get_engine().dispose()
    if backend.name == "postgres":
        services.drop_database(backend.database_url)
