"""Student search without workers: the API's checks, and the coordinator (worker/search.py) driven pass by pass
over trials whose ends are written here the way a worker writes them (status, per-epoch metrics, report)."""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

SPACE = {"mlp": {"hidden_layers": [1, 1], "width": [8, 128]}, "lr": [0.001, 0.01]}


def _body(m: str, d: str, **search) -> dict:
    return {"teacher_model_id": m, "dataset_id": d, "steps": [{"kind": "distill", "epochs": 6}],
            "search": {"objective": "smallest", "max_drop": 0.01, "trials": 4, "space": SPACE,
                       "pruning": {"startup_trials": 2, "warmup_epochs": 1}, **search}}


@pytest.fixture()
def search_job(client, make_key, uploaded):
    """``search_job(**search)`` → (headers, parent id) of a queued search owned by a new tenant."""
    def make(**search):
        h = make_key(f"search-{uuid.uuid4().hex[:8]}")
        m, d = uploaded(h)
        r = client.post("/v1/jobs", headers=h, json=_body(m, d, **search))
        assert r.status_code == 202, r.text
        return h, r.json()["id"]
    return make


def _advance(job_id: str) -> str:
    from app.storage import get_storage
    from worker.search import advance

    return advance(job_id, get_storage())


def _trials(parent_id: str) -> list[dict]:
    from app.db.models import Job
    from app.db.session import session_scope

    with session_scope() as s:
        return [{"id": t.id, "status": t.status, "number": t.trial_number, "trial": t.trial, "spec": t.spec,
                 "error": t.error_code}
                for t in s.scalars(select(Job).where(Job.parent_id == parent_id).order_by(Job.trial_number))]


def _claim(job_id: str, worker: str = "w1") -> None:
    from app.db.session import session_scope
    from app.jobs import state

    with session_scope() as s:
        state.transition(s, job_id, state.RUNNING, allowed_from={state.QUEUED}, worker_id=worker, attempts=1)


def _curve(job_id: str, values: list[float]) -> None:
    from app.db.session import session_scope
    from app.jobs.events import append_metric

    with session_scope() as s:
        for epoch, v in enumerate(values, start=1):
            append_metric(s, job_id, step=0, epoch=epoch, name="val_accuracy", value=v)


def _succeed(job_id: str, *, params: int, accuracy: float, teacher: float = 0.97, latency: float = 0.05) -> None:
    """End a running trial the way the worker does: a report and a student artifact, then ``succeeded``."""
    from app.db.models import Artifact, Job
    from app.db.session import session_scope
    from app.ids import new_id
    from app.jobs import state
    from app.storage import get_storage

    row = {"num_parameters": params, "size_bytes": params * 4, "latency_ms": {"batch_1": latency, "batch_32": 1.0}}
    report = {"teacher": {**row, "num_parameters": 85_000, "accuracy": teacher, "agreement": 1.0},
              "student": {**row, "accuracy": accuracy}, "steps": [], "compression_ratio": 1.0, "speedup": 1.0}
    with session_scope() as s:
        tenant = s.get(Job, job_id).tenant_id
        for kind, fmt, name, content in (("report", "json", "report.json", json.dumps(report).encode()),
                                         ("student", "onnx", "student.onnx", b"onnx bytes of " + job_id.encode())):
            art_id = new_id("artifact")
            with tempfile.NamedTemporaryFile(delete=False) as f:
                f.write(content)
            blob = get_storage().put_file(f"artifacts/{job_id}/{art_id}/{name}", Path(f.name))
            s.add(Artifact(id=art_id, tenant_id=tenant, job_id=job_id, kind=kind, format=fmt, step_index=0,
                           filename=name, media_type="application/octet-stream", size_bytes=blob.size_bytes,
                           sha256=blob.sha256, storage_key=blob.key))
        s.flush()
        state.transition(s, job_id, state.SUCCEEDED, allowed_from={state.RUNNING},
                         metrics={"teacher": {"accuracy": teacher}, "student": {"accuracy": accuracy}})


def _end(job_id: str, to: str, code: str = "cancelled") -> None:
    from app.db.session import session_scope
    from app.jobs import state

    with session_scope() as s:
        state.transition(s, job_id, to, error_code=code, error_message=f"{to} here")


def test_a_bad_search_is_refused_with_the_field_named(client, make_key, uploaded):
    h = make_key("search-422")
    m, d = uploaded(h)
    cases = [
        ({"space": {"mlp": {"width": [64, 8]}}}, "search.space.mlp.width"),
        ({"space": {"mlq": {"width": [8, 64]}}}, "search.space.mlq"),
        ({"space": {"lr": [0.001, 0.01]}}, "search.space"),
        ({"space": {"cnn": {}}}, "search.space.cnn"),  # digits rows are flat features
        ({"space": {"mlp": {}, "temperature": [1, 4]}, "trials": 0}, "search.trials"),
        ({"objective": "best", "space": {"mlp": {}}}, "max_parameters"),
        ({"metric": "r2", "space": {"mlp": {}}}, "search.metric"),
    ]
    for search, field in cases:
        body = _body(m, d)
        body["search"] = {"objective": "smallest", **search}
        r = client.post("/v1/jobs", headers=h, json=body)
        assert r.status_code == 422, (search, r.text)
        assert field in r.json()["detail"], (field, r.json()["detail"])
    r = client.post("/v1/jobs", headers=h, json={**_body(m, d), "student": {"family": "mlp", "hidden": [8]}})
    assert r.status_code == 422 and "search" in r.json()["detail"]
    huge = _body(m, d, space={"mlp": {"hidden_layers": [16, 16], "width": [65536, 65536]}})
    r = client.post("/v1/jobs", headers=h, json=huge)
    assert r.status_code == 422 and r.json()["code"] == "budget_exceeded", r.text
    assert r.json()["errors"][0]["loc"][:4] == ["body", "search", "space", "mlp"]


def test_a_search_is_queued_without_a_message_and_fills_its_defaults(client, search_job):
    from app.db.models import Dispatch, Job
    from app.db.session import session_scope

    h, job_id = search_job(space=None)
    job = client.get(f"/v1/jobs/{job_id}", headers=h).json()
    assert job["status"] == "queued" and job["progress"]["trials"] == 4 and job["progress"]["trials_done"] == 0
    assert job["spec"]["search"]["metric"] == "accuracy"  # labelled digits
    assert set(job["spec"]["search"]["space"]) >= {"mlp", "lr"} and job["spec"]["student"] is None
    with session_scope() as s:
        assert s.get(Job, job_id).role == "search"
        assert s.scalar(select(func.count()).select_from(Dispatch).where(Dispatch.job_id == job_id)) == 0


def test_one_worker_runs_the_trials_in_turn_and_the_smallest_target_meeting_student_wins(client, search_job,
                                                                                         make_key):
    h, job_id = search_job()
    assert _advance(job_id) == "running"
    trials = _trials(job_id)
    assert [t["status"] for t in trials] == ["queued"]  # one waits for a free worker; no more while it waits
    assert _advance(job_id) == "running" and len(_trials(job_id)) == 1
    first = trials[0]
    assert first["spec"]["student"]["family"] == "mlp" and first["spec"]["search"] is None
    assert first["spec"]["steps"][0]["optimizer"]["lr"] == pytest.approx(first["trial"]["params"]["lr"])
    outcomes = {0: (5000, 0.965), 1: (1200, 0.90), 2: (800, 0.962), 3: (3000, 0.968)}
    for n in range(4):  # the one worker: claims the waiting trial, the coordinator queues the next, …
        trial = _trials(job_id)[n]
        _claim(trial["id"])
        _advance(job_id)
        params, acc = outcomes[n]
        _curve(trial["id"], [acc - 0.02, acc])
        _succeed(trial["id"], params=params, accuracy=acc)
        status = _advance(job_id)
    assert status == "succeeded"
    job = client.get(f"/v1/jobs/{job_id}", headers=h).json()
    assert job["progress"]["trials_done"] == 4 and job["progress"]["fraction"] == 1.0
    assert job["metrics"]["search"]["winner"] == 2  # 800 parameters, 0.8 points below the teacher
    arts = client.get(f"/v1/jobs/{job_id}/artifacts", headers=h).json()["data"]
    assert {(a["kind"], a["format"]) for a in arts} == {("student", "onnx"), ("report", "json"), ("plot", "png")}
    winner_student = client.get(f"/v1/jobs/{_trials(job_id)[2]['id']}/artifacts", headers=h).json()["data"]
    student = next(a for a in arts if a["kind"] == "student")
    assert student["sha256"] == next(a["sha256"] for a in winner_student if a["kind"] == "student")
    report = json.loads(client.get(f"/v1/artifacts/{next(a['id'] for a in arts if a['kind'] == 'report')}/content",
                                   headers=h).content)
    table = report["search"]["trials"]
    assert [r["number"] for r in table] == [0, 1, 2, 3] and report["search"]["winner"] == 2
    assert [r["meets_target"] for r in table] == [True, False, True, True]
    assert all(r["worker"] == "w1" and r["status"] == "succeeded" for r in table)
    assert report["student"]["num_parameters"] == 800
    png = client.get(f"/v1/artifacts/{next(a['id'] for a in arts if a['kind'] == 'plot')}/content", headers=h)
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    # Trials are listed under their search, not among the tenant's jobs.
    listed = client.get(f"/v1/jobs/{job_id}/trials", headers=h).json()["data"]
    assert sorted(t["trial"]["number"] for t in listed) == [0, 1, 2, 3] and all(t["parent_id"] == job_id
                                                                             for t in listed)
    assert len(client.get(f"/v1/jobs?parent_id={job_id}", headers=h).json()["data"]) == 4
    assert [j["id"] for j in client.get("/v1/jobs", headers=h).json()["data"]] == [job_id]
    other = make_key("search-other")
    assert client.get(f"/v1/jobs/{job_id}/trials", headers=other).status_code == 404
    assert client.get(f"/v1/jobs?parent_id={job_id}", headers=other).json()["data"] == []


def test_parallel_fans_trials_out_and_a_trial_below_the_median_is_pruned(client, search_job):
    h, job_id = search_job(parallel=3, trials=4)
    _advance(job_id)
    trials = _trials(job_id)
    assert len(trials) == 3 and len({json.dumps(t["trial"]["params"], sort_keys=True) for t in trials}) == 3
    for t, acc in zip(trials[:2], (0.96, 0.95)):
        _claim(t["id"])
        _curve(t["id"], [acc - 0.1, acc - 0.05, acc])
        _succeed(t["id"], params=1000, accuracy=acc, teacher=0.99)
    slow = trials[2]
    _claim(slow["id"], worker="w2")
    _curve(slow["id"], [0.5, 0.55])  # far below both finished trials at epochs 1 and 2
    _advance(job_id)
    after = {t["number"]: t for t in _trials(job_id)}
    assert after[2]["status"] == "cancelling" and after[2]["trial"]["pruned"]["epoch"] == 2
    assert after[2]["trial"]["pruned"]["median"] == pytest.approx(0.905)
    assert len(after) == 4  # the fourth trial is queued in its place
    _end(slow["id"], "cancelled")
    _claim(after[3]["id"])
    _succeed(after[3]["id"], params=4000, accuracy=0.97, teacher=0.99)
    assert _advance(job_id) == "failed"  # no trial within one point of 0.99
    job = client.get(f"/v1/jobs/{job_id}", headers=h).json()
    assert job["error"]["code"] == "search_no_feasible_trial"
    assert "trial 3" in job["error"]["message"] and "0.0200 below" in job["error"]["message"]
    report = json.loads(client.get(
        f"/v1/artifacts/{next(a['id'] for a in client.get(f'/v1/jobs/{job_id}/artifacts', headers=h).json()['data'] if a['kind'] == 'report')}/content",
        headers=h).content)
    assert [r["status"] for r in report["search"]["trials"]] == ["succeeded", "succeeded", "pruned", "succeeded"]


def test_cancelling_a_search_cancels_its_queued_and_running_trials(client, search_job):
    h, job_id = search_job(parallel=2)
    _advance(job_id)
    running, queued = _trials(job_id)
    _claim(running["id"])
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=h)
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    statuses = {t["number"]: t["status"] for t in _trials(job_id)}
    assert statuses == {0: "cancelling", 1: "cancelled"}
    assert _advance(job_id) == "cancelling"  # waits for the running trial's worker to stop it
    assert len(_trials(job_id)) == 2  # and asks for no new trial
    _end(running["id"], "cancelled")
    assert _advance(job_id) == "cancelled"
    assert client.get(f"/v1/jobs/{job_id}", headers=h).json()["status"] == "cancelled"


def test_a_search_whose_trials_keep_failing_fails_fast(client, search_job):
    h, job_id = search_job(parallel=3, trials=10)
    _advance(job_id)
    for t in _trials(job_id):
        _claim(t["id"])
        _end(t["id"], "failed", code="invalid_spec")
    assert _advance(job_id) == "failed"
    job = client.get(f"/v1/jobs/{job_id}", headers=h).json()
    assert job["error"]["code"] == "search_trials_failed" and "invalid_spec" in job["error"]["message"]
    assert len(_trials(job_id)) == 3


def test_the_study_is_rebuilt_deterministically_from_the_rows(client, search_job):
    """Two leaders given the same rows sample the same next trial; the next trial differs from the last."""
    from app.db.models import Job
    from app.db.session import session_scope
    from jobspec import JobSpec
    from worker.search import sample

    h, job_id = search_job()
    _advance(job_id)
    with session_scope() as s:
        search = JobSpec.model_validate(s.get(Job, job_id).spec).search
        rows = list(s.scalars(select(Job).where(Job.parent_id == job_id)))
        assert sample(search, 0, rows) == sample(search, 0, rows)
        assert sample(search, 0, rows) != rows[0].trial["params"]
