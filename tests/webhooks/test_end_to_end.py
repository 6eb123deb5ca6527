"""Webhooks end to end: a real job's ``job.running`` and ``job.succeeded`` reach the receiver, verified with
the ``standardwebhooks`` library; killed processes lose no event (the outbox is in the database)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.support.fixtures import ROOT, start_process, stop_process
from tests.support.jobs import job_body
from tests.support.wait import wait_until
from tests.support.webhooks import HANG, insert_job, verify

pytestmark = pytest.mark.slow  # real jobs through a real worker, processes killed on purpose


def test_a_real_job_sends_running_and_succeeded_with_its_artifacts_and_report(client, endpoint, uploaded,
                                                                               hook_settings, receiver):
    from app.webhooks.delivery import deliver_due
    from worker import runner

    h, created = endpoint("e2e-job", events=["job.running", "job.succeeded"])
    m, d = uploaded(h)
    job_id = client.post("/v1/jobs", headers=h, json=job_body(m, d, exports=["onnx"])).json()["id"]
    assert runner.run_job(job_id, hook_settings) == "succeeded"
    wait_until(lambda: deliver_due(hook_settings) >= 0 and len(receiver.requests) == 2, 20, "two events")
    running, succeeded = (verify(created["secret"], r) for r in receiver.requests)
    assert running["type"] == "job.running"
    assert running["data"]["job"]["id"] == job_id and running["data"]["job"]["status"] == "running"
    assert running["data"]["job"]["attempts"] == 1 and "artifacts" not in running["data"]
    assert succeeded["type"] == "job.succeeded"
    assert succeeded["data"]["job"] == client.get(f"/v1/jobs/{job_id}", headers=h).json()
    artifacts = client.get(f"/v1/jobs/{job_id}/artifacts", headers=h).json()["data"]
    assert succeeded["data"]["artifacts"] == artifacts
    assert {"student", "report"} <= {a["kind"] for a in artifacts}
    report_art = next(a for a in artifacts if a["kind"] == "report")
    report = json.loads(client.get(f"/v1/artifacts/{report_art['id']}/content", headers=h).content)
    summary = succeeded["data"]["report"]
    assert summary == {k: report[k] for k in ("teacher", "student", "compression_ratio", "parameter_ratio", "speedup")}


def _env() -> dict[str, str]:
    return {"DISTILLERY_WEBHOOK_ALLOW_HTTP": "true", "DISTILLERY_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
            "DISTILLERY_WEBHOOK_TIMEOUT_SECONDS": "1", "DISTILLERY_WEBHOOK_RETRY_SCHEDULE": "0,0",
            "DISTILLERY_DISPATCH_INTERVAL_SECONDS": "0.1"}


def test_killed_processes_between_the_transition_and_the_delivery_lose_no_event(client, endpoint, hook_settings,
                                                                                 receiver, tmp_path):
    h, created = endpoint("e2e-crash")
    job_id = insert_job(h)
    # 1. A process commits the transition and is killed at once: no sender ran, nothing was sent.
    code = ("import os, signal\nfrom tests.support.webhooks import move\n"
            f"move({job_id!r}, 'running')\nos.kill(os.getpid(), signal.SIGKILL)")
    died = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **_env()}, timeout=60)
    assert died.returncode == -signal.SIGKILL
    [pending] = client.get(f"/v1/webhooks/{created['id']}/deliveries", headers=h).json()["data"]
    assert (pending["event_type"], pending["status"], pending["attempt"]) == ("job.running", "pending", 0)
    assert receiver.requests == []
    # 2. A sender process takes the delivery and is killed while the receiver holds the request.
    receiver.answers = [HANG]
    first = start_process([sys.executable, "-m", "worker.webhooks"], tmp_path / "sender-1.log", env=_env())
    try:
        wait_until(lambda: receiver.requests or first.poll() is not None, 60, "the first attempt")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    receiver.release()
    assert len(receiver.requests) == 1, (tmp_path / "sender-1.log").read_text()
    # 3. A new sender delivers it once the dead one's leadership and claim have run out.
    def delivery() -> dict:
        return client.get(f"/v1/webhooks/{created['id']}/deliveries", headers=h).json()["data"][0]

    second = start_process([sys.executable, "-m", "worker.webhooks"], tmp_path / "sender-2.log", env=_env())
    try:
        took = wait_until(lambda: delivery()["status"] != "pending" or second.poll() is not None, 60,
                          "the re-delivery")
        print(f"re-delivered {took:.1f} s after the new sender started")  # docs/operations.md quotes it
    finally:
        stop_process(second)
    done = delivery()
    assert (done["status"], done["attempt"], done["response_status"]) == ("succeeded", 2, 200), \
        (tmp_path / "sender-2.log").read_text()
    held, delivered = receiver.requests
    assert delivered.answered == 200 and delivered.headers["webhook-id"] == held.headers["webhook-id"]
    event = verify(created["secret"], delivered)
    assert event["type"] == "job.running" and event["data"]["job"]["id"] == job_id
