"""A worker killed mid-job: the lease expires, the reaper requeues the job, another worker finishes it —
resuming from the last training checkpoint instead of starting over."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid

import pytest

from tests.support.fixtures import start_process, stop_process, wait_for_log
from tests.support.jobs import job_body
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]  # the chaos suite


def _job(job_id: str) -> dict:
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as s:
        job = s.get(Job, job_id)
        return {"status": job.status, "attempts": job.attempts, "progress": job.progress or {},
                "error": job.error_message}


def test_job_survives_a_killed_worker(client, make_key, uploaded, monkeypatch, tmp_path):
    from app.settings import get_settings

    queue = f"loss-{uuid.uuid4().hex[:6]}"
    env = {"DISTILLERY_WORKER_QUEUES": queue, "DISTILLERY_LEASE_SECONDS": "5", "DISTILLERY_CHECKPOINT_SECONDS": "0"}
    monkeypatch.setattr(get_settings(), "job_queue", queue)
    h = make_key("worker-loss")
    m, d = uploaded(h, fmt="torchscript")
    first = start_process([sys.executable, "-m", "app.cli", "worker"], tmp_path / "a.log", env=env)
    wait_for_log(first, tmp_path / "a.log", "ready.", timeout=60)
    job_id = client.post("/v1/jobs", headers=h, json=job_body(
        m, d, steps=[{"kind": "distill", "epochs": 20, "batch_size": 16}], exports=["torchscript"])).json()["id"]
    # The checkpoint of epoch 3 is in storage once its ``checkpoint_saved`` event is recorded (the supervisor
    # copies it before relaying the event); progress alone may run ahead of that copy.
    def saved_epoch() -> int:
        events = client.get(f"/v1/jobs/{job_id}/events", headers=h).json()["data"]
        return max((e["data"]["epoch"] for e in events if e["type"] == "checkpoint_saved"), default=0)

    wait_until(lambda: saved_epoch() >= 3, 60, "a checkpoint after three epochs of training")
    os.killpg(first.pid, signal.SIGKILL)  # no goodbye: no ack, no status change, the lease simply runs out
    first.wait()
    assert _job(job_id)["status"] == "running"

    killed = time.monotonic()
    second = start_process([sys.executable, "-m", "app.cli", "worker"], tmp_path / "b.log", env=env)
    try:
        # requeued by the leader's reaper, claimed by the new worker
        wait_until(lambda: _job(job_id)["attempts"] >= 2, 60, "the job to restart on the new worker")
        restarted = time.monotonic() - killed
        print(f"CHAOS worker kill -9 (lease 5 s): the job restarted on another worker {restarted:.1f} s later")
        assert restarted < 5 + 10, "a dead worker's job restarts within lease + 10 s"
        wait_until(lambda: _job(job_id)["status"] in ("succeeded", "failed", "cancelled"), 120, "the job to end")
    finally:
        stop_process(second)
    final = _job(job_id)
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 2
    events = [e["type"] for e in client.get(f"/v1/jobs/{job_id}/events", headers=h).json()["data"]]
    assert events.count("started") == 2 and "requeued" in events
    # The second attempt continued from the checkpoint, not from epoch 1 ...
    resumed = next(e for e in client.get(f"/v1/jobs/{job_id}/events", headers=h).json()["data"]
                   if e["type"] == "resumed")
    assert resumed["data"]["epoch"] >= 3, resumed
    # ... and the checkpoint is gone once the job has finished.
    from app.storage import get_storage

    assert not get_storage().local_path(f"checkpoints/{job_id}").exists()
