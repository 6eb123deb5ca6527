"""`distillery run` (migrate, API and one worker in one command) as a test's own process, with an API key."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.fixtures import ROOT, stop_process, wait_for_log
from tests.support.flow import wait_http


@contextmanager
def embedded_service(env: dict[str, str], data: Path, port: int, tenant: str) -> Iterator[dict]:
    """Start `distillery run` with exactly ``env`` (its data dir ``data``, listening on ``port``), wait until the
    API answers and the worker consumes, create a key of ``tenant``; yields url, key, proc, log and data."""
    log = data / "run.log"
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "run"], cwd=ROOT, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url)
        wait_for_log(proc, log, "ready.", timeout=90)  # the worker is consuming
        out = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--tenant", tenant], cwd=ROOT,
                             env=env, capture_output=True, text=True, check=True)
        key = out.stdout.strip().splitlines()[-1]
        yield {"url": url, "key": key, "proc": proc, "log": log, "data": data}
    finally:
        stop_process(proc)
