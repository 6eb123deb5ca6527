"""Faults an operator meets, with real processes: each test breaks one thing mid-flight and measures how the
service recovers. Every job must end in the right terminal state, none run twice, none lost; the recovery
times are printed (``pytest -s -n0``) and recorded in docs/operations.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.fixtures import start_process, stop_process, wait_for_log
from tests.support.jobs import job_body
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]  # the chaos suite
TERMINAL = ("succeeded", "failed", "cancelled")


def _job(job_id: str) -> dict:
    from sqlalchemy import select

    from app.db.models import Job, JobEvent
    from app.db.session import session_scope

    with session_scope() as s:
        job = s.get(Job, job_id)
        events = list(s.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))
        return {"status": job.status, "attempts": job.attempts, "progress": job.progress or {},
                "error": job.error_message, "events": events}


def _worker(tmp_path: Path, name: str, env: dict[str, str]) -> subprocess.Popen:
    log = tmp_path / f"{name}.log"
    proc = start_process([sys.executable, "-m", "app.cli", "worker"], log, env=env)
    wait_for_log(proc, log, "ready.", timeout=90)
    return proc


def test_sigterm_releases_the_job_and_another_worker_finishes_it(client, make_key, uploaded, monkeypatch, tmp_path):
    from app.settings import get_settings

    queue = f"term-{uuid.uuid4().hex[:6]}"
    env = {"DISTILLERY_WORKER_QUEUES": queue, "DISTILLERY_LEASE_SECONDS": "30", "DISTILLERY_CHECKPOINT_SECONDS": "3600",
           "DISTILLERY_SHUTDOWN_GRACE_SECONDS": "15"}
    monkeypatch.setattr(get_settings(), "job_queue", queue)
    h = make_key("chaos-term")
    m, d = uploaded(h, fmt="torchscript")
    first = _worker(tmp_path, "a", env)
    job_id = client.post("/v1/jobs", headers=h, json=job_body(
        m, d, steps=[{"kind": "distill", "epochs": 20, "batch_size": 16}], exports=["torchscript"])).json()["id"]
    wait_until(lambda: _job(job_id)["progress"].get("epoch", 0) >= 2, 90, "training to start")
    began = time.monotonic()
    os.killpg(first.pid, signal.SIGTERM)
    first.wait(timeout=20)
    exited = time.monotonic() - began
    released = _job(job_id)
    assert released["status"] == "queued" and released["attempts"] == 0 and "released" in released["events"], released
    second = _worker(tmp_path, "b", env)
    try:
        took = wait_until(lambda: _job(job_id)["status"] in TERMINAL, 120, "the second worker to finish the job")
    finally:
        stop_process(second)
    final = _job(job_id)
    assert final["status"] == "succeeded" and final["attempts"] == 1, final
    assert final["events"].count("started") == 2 and "resumed" in final["events"]
    print(f"CHAOS sigterm: worker exited {exited:.1f} s after SIGTERM (grace 15 s); the next worker finished "
          f"the job {took:.1f} s after it started; attempts == 1")
    assert exited < 15
