"""Test configuration shared by every suite.

The environment is set here, before anything imports ``app`` (settings are read once per process): the
embedded default — SQLite and the SQLite-backed queue — in a temporary data directory, a queue name private
to this process (so parallel runs and stray workers never take each other's jobs), the CPU, one thread.

Nothing here connects to a server. Tests marked ``integration`` or ``postgres`` get a throwaway PostgreSQL
database (with the local Redis as broker), created the first time one of them runs
(``tests.support.fixtures.postgres_backend``); the others never touch PostgreSQL or Redis.
"""

from __future__ import annotations

import os
import shutil

from tests.support import backends, run

os.environ.pop("DISTILLERY_BROKER_URL", None)  # SQLite's own queue unless a test activates PostgreSQL + Redis
os.environ.update({
    **backends.sqlite(run.TMP).env,
    "DISTILLERY_JOB_QUEUE": run.QUEUE,
    "DISTILLERY_WORKER_QUEUES": run.QUEUE,
    "DISTILLERY_DEVICE": "cpu",
    "DISTILLERY_WORKER_THREADS": "1",
    "DISTILLERY_LEASE_SECONDS": "60",
})

pytest_plugins = ["tests.support.fixtures"]


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per CPU this process may run on (not the host's count a container reports), at
    most 8 — beyond that the suite's own servers and executors only queue for the same CPUs."""
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(run.TMP, ignore_errors=True)
