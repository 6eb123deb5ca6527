"""Test configuration shared by every suite.

The environment is set before anything imports ``app`` (settings are read once per process):
a throwaway PostgreSQL database, the local Redis as broker, a queue name private to this run (so
parallel runs and stray workers never take each other's jobs) and a temporary data directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from tests.support.services import REDIS_URL, create_database, drop_database

_TMP = Path(tempfile.mkdtemp(prefix="distillery-test-"))
_DB_URL = create_database()
QUEUE = f"test-{uuid.uuid4().hex[:8]}"
os.environ.update({
    "DISTILLERY_DATA_DIR": str(_TMP / "data"),
    "DISTILLERY_BROKER_URL": REDIS_URL,
    "DISTILLERY_JOB_QUEUE": QUEUE,
    "DISTILLERY_WORKER_QUEUES": QUEUE,
    "DISTILLERY_DEVICE": "cpu",
    "DISTILLERY_WORKER_THREADS": "1",
    "DISTILLERY_LEASE_SECONDS": "60",
})
os.environ["DISTILLERY_DATABASE_URL"] = _DB_URL or f"sqlite:///{_TMP / 'unused.db'}"
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")

pytest_plugins = ["tests.support.fixtures"]


def pytest_sessionfinish(session, exitstatus):
    if _DB_URL:
        try:
            from app.db.session import get_engine

            get_engine().dispose()
            drop_database(_DB_URL)
        except Exception as exc:  # leave the database behind rather than hide the test result
            print(f"could not drop {_DB_URL}: {exc}")
    shutil.rmtree(_TMP, ignore_errors=True)
