"""The worker's ending of a job: the ``job.succeeded`` event lists the artifacts stored with the transition and
summarises the report; an attempt fenced out meanwhile stores nothing and announces nothing."""

from __future__ import annotations

import json

from tests.support.webhooks import insert_job, move


def _result(tmp_path):
    import engine

    (tmp_path / "student.onnx").write_bytes(b"onnx bytes")
    report = {"teacher": {"num_parameters": 100}, "student": {"num_parameters": 10}, "compression_ratio": 9.5,
              "parameter_ratio": 10.0, "speedup": 3.0, "reproducibility": {"seed": 0}, "steps": []}
    (tmp_path / "report.json").write_text(json.dumps(report))
    return engine.EngineResult(artifacts=[
        engine.ArtifactFile("student", "onnx", tmp_path / "student.onnx", 0, "application/octet-stream"),
        engine.ArtifactFile("report", "json", tmp_path / "report.json", None, "application/json")],
        metrics={"student": {"accuracy": 0.9}}), report


def _attempt(job_id: str, token: str):
    from worker.attempt import Attempt

    return Attempt(job_id, token, 1, "test-worker", 60, db_retry_seconds=1.0)


def test_succeeded_event_carries_the_stored_artifacts_and_the_report_summary(client, endpoint, hook_settings,
                                                                             tmp_path):
    from app.db.models import WebhookDelivery
    from app.db.session import session_scope
    from app.storage import get_storage
    from worker import runner

    h, created = endpoint("runner-events", events=["job.succeeded"])
    job = insert_job(h)
    move(job, "running", lease_token="tok-1")
    result, report = _result(tmp_path)
    assert runner._succeed(_attempt(job, "tok-1"), get_storage(), result) == "succeeded"
    with session_scope() as s:
        [d] = s.query(WebhookDelivery).filter_by(endpoint_id=created["id"]).all()
        data = d.payload["data"]
    assert data["artifacts"] == client.get(f"/v1/jobs/{job}/artifacts", headers=h).json()["data"]
    assert [a["kind"] for a in data["artifacts"]] == ["student", "report"]
    assert data["report"] == {k: report[k] for k in ("teacher", "student", "compression_ratio", "parameter_ratio",
                                                     "speedup")}
    assert data["job"]["status"] == "succeeded" and data["job"]["metrics"] == {"student": {"accuracy": 0.9}}


def test_a_fenced_out_attempt_stores_no_artifact_and_sends_no_event(client, endpoint, hook_settings, tmp_path):
    from app.db.models import Artifact, WebhookDelivery
    from app.db.session import session_scope
    from app.jobs import state
    from app.storage import get_storage
    from worker import runner

    h, created = endpoint("runner-fenced", events=["job.succeeded", "job.failed"])
    job = insert_job(h)
    move(job, "running", lease_token="tok-new")
    result, _ = _result(tmp_path)
    assert runner._finish_with_artifacts(_attempt(job, "tok-stale"), get_storage(), result, state.SUCCEEDED, "done",
                                         level="info", event_data={}) is False
    with session_scope() as s:
        assert s.query(Artifact).filter_by(job_id=job).count() == 0
        assert s.query(WebhookDelivery).filter_by(endpoint_id=created["id"]).count() == 0
    assert client.get(f"/v1/jobs/{job}", headers=h).json()["status"] == "running"
