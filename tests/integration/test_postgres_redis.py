"""The whole service on PostgreSQL + Redis, API and worker as separate processes."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from app.queue import RUN_JOB
from tests.support.flow import check_student_files, distill_digits, upload_inputs, wait_for
from tests.support.teachers import npz_bytes
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration


@pytest.mark.slow  # trains a whole job to an accuracy floor
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_kd_job_end_to_end(http, teacher_files, digits, fmt):
    job, files = distill_digits(http, teacher_files[fmt], digits)
    report = check_student_files(files, digits, min_accuracy=0.90)
    assert job["progress"]["fraction"] == 1.0 and job["attempts"] == 1
    assert job["metrics"]["student"]["accuracy"] >= 0.90 and job["metrics"]["student"]["agreement"] >= 0.90
    assert report["teacher"]["accuracy"] >= 0.95 and report["compression_ratio"] > 1
    types = [e["type"] for e in http.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
    assert types[0] == "queued" and "started" in types and "validate" in types and types[-1] == "succeeded"
    series = http.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
    assert len([p for p in series if p["name"] == "val_accuracy"]) == 30


def test_cancel_running_job_within_5_seconds(http, teacher_files, digits):
    model_id, dataset_id = upload_inputs(http, teacher_files["torchscript"], digits)
    job = http.post("/v1/jobs", json={"teacher_model_id": model_id, "dataset_id": dataset_id,
                                      "student": {"family": "mlp", "hidden": [32]},
                                      "steps": [{"kind": "distill", "epochs": 5000, "batch_size": 8}]}).json()
    running = wait_for(http, job["id"], until={"running", "failed", "succeeded"}, timeout=60)
    assert running["status"] == "running"
    wait_until(lambda: (http.get(f"/v1/jobs/{job['id']}").json()["progress"] or {}).get("epoch", 0) >= 1, 60,
               "the job to get into training")
    asked = time.monotonic()
    r = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] in ("cancelling", "cancelled")
    final = wait_for(http, job["id"], timeout=5)
    assert final["status"] == "cancelled" and time.monotonic() - asked < 5
    assert final["error"]["code"] == "cancelled"
    assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202  # idempotent once cancelled


def test_shape_mismatch_fails_fast_with_precise_message(http, teacher_files, digits):
    model_id = http.post("/v1/models", files={"file": ("t.pt", teacher_files["torchscript"].read_bytes())},
                         data={"name": "t"}).json()["id"]
    x = np.random.default_rng(0).random((100, 20), dtype=np.float32)
    ds = http.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(x=x, y=np.zeros(100, np.int64)))},
                   data={"name": "wrong-width", "format": "npz"}).json()["id"]
    job = http.post("/v1/jobs", json={"teacher_model_id": model_id, "dataset_id": ds,
                                      "student": {"family": "mlp", "hidden": [8]}}).json()
    final = wait_for(http, job["id"], timeout=60)
    assert final["status"] == "failed" and final["error"]["code"] == "shape_mismatch"
    assert "20" in final["error"]["message"] and "64" in final["error"]["message"]
    from datetime import datetime

    took = datetime.fromisoformat(final["finished_at"]) - datetime.fromisoformat(final["started_at"])
    assert took.total_seconds() < 5, took


def _finished_tasks(log_path) -> dict[str, str]:
    """{celery task id: what ``distillery.run_job`` returned} for every task the worker has finished."""
    done = re.finditer(rf"Task {re.escape(RUN_JOB)}\[([0-9a-f-]+)\] succeeded in [0-9.e-]+s: '(\w+)'",
                       log_path.read_text(errors="replace"))
    return {m.group(1): m.group(2) for m in done}


def test_duplicate_delivery_runs_once(http, teacher_files, digits, celery_worker):
    """Two extra messages for a job beside the one its dispatch publishes: the job runs once, and every message
    is consumed and turned away.

    A duplicate may arrive before the dispatch's own message and run the job; the dispatcher then settles the
    dispatch without publishing (the job is no longer queued) or publishes a message that is turned away. So
    the test does not count rejections: once the dispatch is settled (its message, if any, is in the queue), it
    sends a last duplicate. The queue is FIFO and the session's worker runs one task at a time, so that last
    one being done means every message before it was consumed and acknowledged."""
    from app.db.models import Dispatch
    from app.db.session import session_scope
    from app.queue import get_celery
    from app.settings import get_settings

    def send_duplicate() -> str:
        return get_celery().send_task(RUN_JOB, args=[job["id"]], queue=get_settings().job_queue).id

    def dispatch_settled() -> bool:
        with session_scope() as s:
            return all(d.sent_at is not None for d in s.query(Dispatch).filter(Dispatch.job_id == job["id"]))

    model_id, dataset_id = upload_inputs(http, teacher_files["onnx"], digits)
    job = http.post("/v1/jobs", json={"teacher_model_id": model_id, "dataset_id": dataset_id,
                                      "student": {"family": "mlp", "hidden": [16]},
                                      "steps": [{"kind": "distill", "epochs": 1}], "exports": ["onnx"]}).json()
    early = [send_duplicate(), send_duplicate()]
    final = wait_for(http, job["id"])
    assert final["status"] == "succeeded" and final["attempts"] == 1
    wait_until(dispatch_settled, 30, "the job's dispatch to be settled")
    last = send_duplicate()
    wait_until(lambda: {*early, last} <= set(_finished_tasks(celery_worker.log_path)), 60,
               "every duplicate to be consumed")
    returned = _finished_tasks(celery_worker.log_path)
    assert returned[last] == "skipped"  # the job had ended: turned away
    assert sorted(returned[t] for t in early) in (["skipped", "skipped"], ["skipped", "succeeded"]), returned
    events = http.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["type"] for e in events].count("started") == 1
    arts = http.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    assert sorted(a["kind"] for a in arts).count("student") == 1


def test_events_stream_follows_until_the_job_ends(http, api_url, teacher_files, digits):
    model_id, dataset_id = upload_inputs(http, teacher_files["onnx"], digits)
    job = http.post("/v1/jobs", json={"teacher_model_id": model_id, "dataset_id": dataset_id,
                                      "student": {"family": "mlp", "hidden": [16]},
                                      "steps": [{"kind": "distill", "epochs": 3}], "exports": ["onnx"]}).json()
    seen = []
    with http.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"},
                     timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                seen.append(line[len("event: "):])
    assert seen[0] == "queued" and seen[-1] == "end" and "succeeded" in seen
