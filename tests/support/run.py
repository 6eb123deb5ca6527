"""What is private to this test process: a temporary root and the queue names its jobs go to.

A queue of its own per process keeps parallel runs (and pytest-xdist workers) from taking each other's jobs."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

TMP = Path(tempfile.mkdtemp(prefix="distillery-test-"))
#: Where jobs are sent by default; the session's worker (tests.support.fixtures.celery_worker) consumes it.
QUEUE = f"test-{uuid.uuid4().hex[:8]}"
#: Where the in-process client's jobs go: no worker consumes it, so queued jobs stay queued.
PARKED_QUEUE = f"parked-{os.getpid()}-{uuid.uuid4().hex[:6]}"
