"""MLflow tracking against a real ``mlflow server``: the run, its metrics and files, the registered model, and
a tracker that is away or refuses (the job never notices but for an event and ``tracking.mlflow.status``)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from tests.support.jobs import job_body
from tests.support.services import free_port
from tests.support.wait import wait_until
from tests.tracking.conftest import events, job_row, run_job

# A stand-in executor that ends the job as a success with a report (and, with STUDENT, an ONNX "student":
# opaque bytes to the worker, which never opens the file it registers).
SUCCEED = """
    os.makedirs("out", exist_ok=True)
    json.dump({"teacher": {"accuracy": 0.97, "size_bytes": 400000}, "student": {"accuracy": 0.91, "size_bytes": 9000,
               "latency_ms": {"batch_1": 0.1, "batch_32": 0.4}}, "compression_ratio": 44.4, "speedup": 3.0,
               "data": {"task": "classification", "inputs": {"x": [64]}, "output_width": 10}}, open("out/report.json", "w"))
    send({"type": "metric", "step": 0, "epoch": 0, "name": "train_loss", "value": 1.5})
    send({"type": "metric", "step": 0, "epoch": 1, "name": "train_loss", "value": 0.5})
    send({"type": "result", "status": "succeeded", "metrics": {"student": {"accuracy": 0.91}},
          "artifacts": [{"kind": "report", "format": "json", "path": "report.json"}]})
"""


def _tracked(experiment: str, register: str | None = None, **fields) -> dict:
    mlflow = {"experiment": experiment, "run_name": f"run-{experiment}"}
    if register:
        mlflow["register"] = {"name": register}
    return {"tracking": {"mlflow": mlflow}, **fields}


def _create(client, headers, m, d, **fields) -> str:
    r = client.post("/v1/jobs", headers=headers, json=job_body(m, d, **fields))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_a_tracked_job_logs_its_run_and_registers_a_model_that_predicts(client, make_key, uploaded, tracking_uri,
                                                                       mlflow_server, digits):
    import mlflow

    h = make_key("track-real")
    m, d = uploaded(h)
    job_id = _create(client, h, m, d, steps=[{"kind": "distill", "epochs": 3}], exports=["onnx"],
                     **_tracked("digits-real", register="digits-student"))
    assert client.get(f"/v1/jobs/{job_id}", headers=h).json()["tracking"]["mlflow"]["status"] == "pending"
    assert run_job(job_id) == "succeeded", job_row(job_id).error_message

    job = client.get(f"/v1/jobs/{job_id}", headers=h).json()
    tracked = job["tracking"]["mlflow"]
    assert tracked["status"] == "logged" and tracked["error"] is None, (tracked, events(job_id, "tracking"))
    assert tracked["model_version"] == "1"
    mc = mlflow_server.client()
    run = mc.get_run(tracked["run_id"])
    assert (run.info.status, run.info.run_name, run.info.experiment_id) == ("FINISHED", "run-digits-real",
                                                                              tracked["experiment_id"])
    assert mc.get_experiment(tracked["experiment_id"]).name == "digits-real"
    # The flattened spec as params, the job and the teacher as tags.
    assert run.data.params["steps.0.epochs"] == "3" and run.data.params["student.hidden"] == "[32]"
    teacher_sha = client.get(f"/v1/models/{m}", headers=h).json()["sha256"]
    assert run.data.tags["distillery.job_id"] == job_id and run.data.tags["distillery.teacher_sha256"] == teacher_sha
    # Every per-epoch metric with its epoch as the step, the same values as the job's own series.
    series = client.get(f"/v1/jobs/{job_id}/metrics", headers=h).json()["data"]
    ours = [(p["epoch"], p["value"]) for p in series if p["name"] == "train_loss"]
    theirs = [(p.step, p.value) for p in mc.get_metric_history(run.info.run_id, "train_loss")]
    assert len(ours) == 3 and sorted(theirs) == sorted(ours)
    assert run.data.metrics["student.accuracy"] == pytest.approx(job["metrics"]["student"]["accuracy"])
    assert "teacher.accuracy" in run.data.metrics and "compression_ratio" in run.data.metrics
    # The report, the model card, the plots and the student files as artifacts.
    files = {a.path for a in mc.list_artifacts(run.info.run_id)}
    assert {"report.json", "model_card.md", "plots", "student", "model"} <= files, files
    assert {a.path for a in mc.list_artifacts(run.info.run_id, "student")} == {"student/student.onnx"}
    report = json.loads(open(mc.download_artifacts(run.info.run_id, "report.json")).read())
    assert report["reproducibility"]["teacher_sha256"] == teacher_sha

    version = mc.get_model_version("digits-student", "1")
    assert version.run_id == run.info.run_id
    assert (version.tags["distillery.job_id"], version.tags["distillery.teacher_sha256"]) == (job_id, teacher_sha)
    assert version.tags["distillery.flavour"] == "onnx"
    mlflow.set_tracking_uri(mlflow_server.url)
    model = mlflow.pyfunc.load_model("models:/digits-student/1")
    assert str(model.metadata.signature.inputs) == "['x': Tensor('float32', (-1, 64))]"
    # The registered model is the job's student: on the held-out rows (the dataset's x_val) it scores what the
    # report says.
    logits = np.asarray(model.predict(digits.x_test)["logits"])
    accuracy = float((logits.argmax(1) == digits.y_test).mean())
    assert logits.shape == (len(digits.x_test), 10)
    assert accuracy == pytest.approx(job["metrics"]["student"]["accuracy"], abs=1e-6) and accuracy > 0.2
    assert mlflow.onnx.load_model("models:/digits-student/1").graph.input[0].name == "x"
    assert [level for _t, level, _m in events(job_id, "tracking")] == ["info", "info"]


def test_a_failed_job_ends_its_run_failed(client, make_key, uploaded, tracking_uri, mlflow_server, executor):
    h = make_key("track-failed")
    m, d = uploaded(h)
    job_id = _create(client, h, m, d, **_tracked("digits-failed"))
    # Fails at once: the run is opened (in the tracker's thread) while the job is already ending.
    executor('send({"type": "failed", "code": "invalid_dataset", "message": "column x is text"})')
    assert run_job(job_id) == "failed"
    tracked = job_row(job_id).tracking["mlflow"]
    assert tracked["status"] == "logged", tracked
    run = mlflow_server.client().get_run(tracked["run_id"])
    assert run.info.status == "FAILED"
    assert (run.data.tags["distillery.error_code"], run.data.tags["distillery.error"]) == ("invalid_dataset",
                                                                                          "column x is text")


@pytest.mark.postgres  # a cancel racing the worker and its tracker thread, on the production database
def test_a_cancelled_job_ends_its_run_killed(client, make_key, uploaded, tracking_uri, mlflow_server, executor):
    h = make_key("track-cancel")
    m, d = uploaded(h)
    job_id = _create(client, h, m, d, **_tracked("digits-cancel"))
    executor('send({"type": "metric", "step": 0, "epoch": 0, "name": "train_loss", "value": 2.0})\n'
             "import time; time.sleep(120)")
    ended: list[str] = []
    worker = threading.Thread(target=lambda: ended.append(run_job(job_id)))
    worker.start()
    # Cancel once the run is open and the first epoch's metric has reached it.
    wait_until(lambda: (job_row(job_id).tracking["mlflow"]["run_id"] is not None
                        and mlflow_server.client().get_metric_history(job_row(job_id).tracking["mlflow"]["run_id"],
                                                                       "train_loss")), 60, "the run and its metric")
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=h).status_code == 202
    worker.join(60)
    assert ended == ["cancelled"]
    tracked = job_row(job_id).tracking["mlflow"]
    assert tracked["status"] == "logged"
    assert mlflow_server.client().get_run(tracked["run_id"]).info.status == "KILLED"


def test_an_unreachable_tracker_never_fails_the_job(client, make_key, uploaded, tracking_uri, executor):
    h = make_key("track-away")
    m, d = uploaded(h)
    job_id = _create(client, h, m, d, **_tracked("digits-away"))
    executor(SUCCEED)
    nobody = f"http://127.0.0.1:{free_port()}"  # a port nothing listens on
    began = time.monotonic()
    assert run_job(job_id, mlflow_tracking_uri=nobody) == "succeeded"
    took = time.monotonic() - began
    job = client.get(f"/v1/jobs/{job_id}", headers=h).json()
    assert job["status"] == "succeeded"
    tracked = job["tracking"]["mlflow"]
    assert tracked["status"] == "failed" and tracked["run_id"] is None
    assert tracked["error"].startswith("opening the run: ") and "Connection refused" in tracked["error"], tracked
    [(_type, level, message)] = events(job_id, "tracking")
    assert level == "warning" and message.startswith("tracking failed, the job goes on without it: opening the run")
    assert took < 20, took  # bounded timeouts and retries: seconds, not the client's default minutes


def test_a_tenant_cannot_write_into_another_tenants_experiment_or_model(client, make_key, uploaded, tracking_uri,
                                                                       mlflow_server, executor):
    owner, other = make_key("track-owner"), make_key("track-other")
    mo, do = uploaded(owner)
    first = _create(client, owner, mo, do, exports=["onnx"], **_tracked("shared-name", register="owned-model"))
    executor(SUCCEED.replace('"artifacts": [', '"artifacts": [{"kind": "student", "format": "onnx", "path": '
                             '"student.onnx", "step_index": 0}, ').replace(
        'os.makedirs("out", exist_ok=True)', 'os.makedirs("out", exist_ok=True); open("out/student.onnx", "wb")'
                                             '.write(b"onnx bytes")'))
    assert run_job(first) == "succeeded"
    assert job_row(first).tracking["mlflow"]["model_version"] == "1"

    mx, dx = uploaded(other)
    same_experiment = _create(client, other, mx, dx, **_tracked("shared-name"))
    assert run_job(same_experiment) == "succeeded"
    tracked = job_row(same_experiment).tracking["mlflow"]
    assert tracked["status"] == "failed"
    assert "experiment 'shared-name' exists on the tracking server but was not created by Distillery for this " \
           "tenant" in tracked["error"]
    same_model = _create(client, other, mx, dx, exports=["onnx"], **_tracked("other-own", register="owned-model"))
    assert run_job(same_model) == "succeeded"
    tracked = job_row(same_model).tracking["mlflow"]
    assert tracked["status"] == "failed" and "registered model 'owned-model'" in tracked["error"], tracked
    mc = mlflow_server.client()
    assert [v.version for v in mc.search_model_versions("name='owned-model'")] == ["1"]  # no version added
    assert mc.get_run(tracked["run_id"]).info.status == "FINISHED"  # its own run is still ended


def test_without_a_tracking_server_a_tracked_job_is_refused_before_202(client, make_key, uploaded, monkeypatch):
    from app.settings import get_settings

    monkeypatch.setattr(get_settings(), "mlflow_tracking_uri", None)
    h = make_key("track-none")
    m, d = uploaded(h)
    assert client.get("/v1/capabilities").json()["tracking"] == {"mlflow": False}
    r = client.post("/v1/jobs", headers=h, json=job_body(m, d, **_tracked("x")))
    assert r.status_code == 422 and r.json()["code"] == "tracking_unavailable"
    assert "DISTILLERY_MLFLOW_TRACKING_URI" in r.json()["detail"]
    untracked = client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()
    assert untracked["tracking"] is None
    monkeypatch.setattr(get_settings(), "mlflow_tracking_uri", "http://mlflow.internal:5000")
    assert client.get("/v1/capabilities").json()["tracking"] == {"mlflow": True}
    # A spec rule, checked by the API and the engine alike: register needs a format MLflow can load.
    r = client.post("/v1/jobs", headers=h, json=job_body(m, d, exports=["safetensors"], **_tracked("x", register="r")))
    assert r.status_code == 422 and "needs an 'onnx' or 'torchscript' export" in r.json()["detail"]
    # Cancelled while queued: no run will be made.
    queued = client.post("/v1/jobs", headers=h, json=job_body(m, d, **_tracked("x"))).json()["id"]
    client.post(f"/v1/jobs/{queued}/cancel", headers=h)
    assert client.get(f"/v1/jobs/{queued}", headers=h).json()["tracking"]["mlflow"]["status"] == "disabled"


def test_a_worker_without_mlflow_runs_the_job_untracked(client, make_key, uploaded, tracking_uri, executor,
                                                        monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    h = make_key("track-nomlflow")
    m, d = uploaded(h)
    job_id = _create(client, h, m, d, **_tracked("x"))
    executor(SUCCEED)
    assert run_job(job_id) == "succeeded"
    tracked = job_row(job_id).tracking["mlflow"]
    assert tracked["status"] == "disabled" and tracked["error"].startswith("tracking unavailable: the mlflow package")
    assert [(t, level) for t, level, _m in events(job_id, "tracking")] == [("tracking", "warning")]
