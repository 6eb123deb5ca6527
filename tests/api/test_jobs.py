"""POST/GET /v1/jobs without a worker: validation before 202, defaults, idempotency, cancel of a queued job."""

from __future__ import annotations

from tests.support.jobs import job_body


def test_create_fills_defaults_and_queues(client, make_key, uploaded):
    h = make_key("jobs-a")
    m, d = uploaded(h)
    r = client.post("/v1/jobs", headers=h, json={"teacher_model_id": m, "dataset_id": d,
                                                 "student": {"family": "mlp", "hidden": [32]}})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["id"].startswith("job_") and job["attempts"] == 0
    step = job["spec"]["steps"][0]
    assert step["loss"] == {"type": "kd", "temperature": 4.0, "alpha": 0.9}
    assert step["optimizer"] == {"type": "adamw", "lr": 0.003, "weight_decay": 0.0, "momentum": 0.9}
    assert step["schedule"] == {"type": "plateau", "warmup_fraction": 0.0, "patience": None, "factor": 0.5}
    assert (step["epochs"], step["batch_size"], step["hints"], step["augment"]) == (20, 128, [], None)
    assert job["spec"]["baseline"] is False and job["spec"]["student"]["init"] == "random"
    assert job["spec"]["exports"] == ["torchscript", "onnx", "safetensors"] and job["spec"]["val_fraction"] == 0.1
    assert job["progress"]["fraction"] == 0.0 and job["error"] is None
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=h).json()["data"]
    assert [e["type"] for e in events] == ["queued"] and events[0]["seq"] == 1


def test_validation_before_202(client, make_key, uploaded):
    h = make_key("jobs-b")
    m, d = uploaded(h)
    bad = {
        "unknown field": job_body(m, d, colour="red"),
        "unknown loss": job_body(m, d, steps=[{"kind": "distill", "loss": {"type": "nope"}}]),
        "temperature 0": job_body(m, d, steps=[{"kind": "distill", "loss": {"type": "kd", "temperature": 0}}]),
        "alpha > 1": job_body(m, d, steps=[{"kind": "distill", "loss": {"type": "kd", "alpha": 1.5}}]),
        "no student": job_body(m, d, student=None),
        "unknown step kind": job_body(m, d, steps=[{"kind": "teleport"}]),
        "empty steps": job_body(m, d, steps=[]),
        "val_fraction 1": job_body(m, d, val_fraction=1.0),
        "duplicate export": job_body(m, d, exports=["onnx", "onnx"]),
        "epochs 0": job_body(m, d, steps=[{"kind": "distill", "epochs": 0}]),
    }
    for why, body in bad.items():
        r = client.post("/v1/jobs", headers=h, json=body)
        assert r.status_code == 422, (why, r.text)
        assert r.json()["code"] == "validation_error" and r.json()["errors"], why
    r = client.post("/v1/jobs", headers=h, json=job_body("mdl_missing", d))
    assert r.status_code == 404 and "mdl_missing" in r.json()["detail"]
    r = client.post("/v1/jobs", headers=h, content=b"not json", )
    assert r.status_code == 422


def test_idempotent_replay_and_conflict(client, make_key, uploaded):
    h = make_key("jobs-c")
    m, d = uploaded(h)
    key = {**h, "Idempotency-Key": "create-1"}
    first = client.post("/v1/jobs", headers=key, json=job_body(m, d))
    again = client.post("/v1/jobs", headers=key, json=job_body(m, d))
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = client.post("/v1/jobs", headers=key, json=job_body(m, d, seed=7))
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    assert len(client.get("/v1/jobs", headers=h).json()["data"]) == 1
    # The same key under another tenant is a different key.
    h2 = make_key("jobs-c2")
    m2, d2 = uploaded(h2)
    assert client.post("/v1/jobs", headers={**h2, "Idempotency-Key": "create-1"},
                       json=job_body(m2, d2)).json()["id"] != first.json()["id"]


def test_cancel_queued_job_then_409(client, make_key, uploaded):
    h = make_key("jobs-d")
    m, d = uploaded(h)
    job = client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert r.json()["error"]["code"] == "cancelled" and r.json()["finished_at"]
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    assert again.status_code == 202 and again.json()["status"] == "cancelled"  # idempotent


def test_cancel_finished_job_is_409(client, make_key, uploaded):
    from app.db.session import session_scope
    from app.jobs import state

    h = make_key("jobs-e")
    m, d = uploaded(h)
    job = client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()
    with session_scope() as s:
        state.transition(s, job["id"], state.RUNNING)
        state.transition(s, job["id"], state.SUCCEEDED)
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    assert r.status_code == 409 and r.json()["code"] == "job_finished"


def test_list_filters_and_pagination(client, make_key, uploaded):
    h = make_key("jobs-f")
    m, d = uploaded(h)
    ids = [client.post("/v1/jobs", headers=h, json=job_body(m, d, seed=i)).json()["id"] for i in range(3)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=h)
    assert [j["id"] for j in client.get("/v1/jobs?status=cancelled", headers=h).json()["data"]] == [ids[0]]
    assert len(client.get("/v1/jobs?status=queued", headers=h).json()["data"]) == 2
    assert len(client.get("/v1/jobs?kind=distill", headers=h).json()["data"]) == 3
    assert client.get("/v1/jobs?kind=quantize", headers=h).json()["data"] == []
    assert client.get("/v1/jobs?status=bogus", headers=h).status_code == 422
    p1 = client.get("/v1/jobs?limit=2", headers=h).json()
    p2 = client.get(f"/v1/jobs?limit=2&after={p1['next_cursor']}", headers=h).json()
    assert [j["id"] for j in p1["data"] + p2["data"]] == ids[::-1]


def test_model_in_use_cannot_be_deleted(client, make_key, uploaded):
    h = make_key("jobs-g")
    m, d = uploaded(h)
    job = client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()
    assert client.delete(f"/v1/models/{m}", headers=h).status_code == 409
    assert client.delete(f"/v1/datasets/{d}", headers=h).status_code == 409
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    assert client.delete(f"/v1/models/{m}", headers=h).status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}", headers=h).json()["spec"]["teacher_model_id"] == m


def test_capabilities_and_openapi(client):
    caps = client.get("/v1/capabilities").json()
    assert [c["name"] for c in caps["losses"]] == ["kd", "soft_ce", "hard", "mse", "cosine", "token_kd"]
    assert "temperature" in caps["losses"][0]["config_schema"]["properties"]
    assert [c["name"] for c in caps["student_families"]] == ["mlp", "cnn", "resnet", "embedding_bag",
                                                              "text_transformer", "hf_causal_lm"]
    assert caps["model_formats"] == ["torchscript", "onnx", "torch_export", "safetensors", "hf_transformers"]
    assert caps["dataset_formats"] == ["npz", "pt", "csv", "parquet", "image_folder", "jsonl"]
    assert caps["tasks"] == ["classification", "regression", "embedding", "causal_lm"]
    assert caps["export_formats_by_task"]["causal_lm"] == ["hf", "gguf", "onnx"]
    spec = client.get("/openapi.json").json()
    assert "JobSpec" in spec["components"]["schemas"]
    for path in ("/v1/models", "/v1/datasets", "/v1/jobs", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events",
                 "/v1/jobs/{job_id}/metrics", "/v1/jobs/{job_id}/artifacts", "/v1/artifacts/{artifact_id}/content",
                 "/healthz", "/readyz", "/metrics", "/v1/capabilities"):
        assert path in spec["paths"], path


def test_health_ready_metrics(client, make_key):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    text = client.get("/metrics").text
    assert 'distillery_jobs{status="queued"}' in text and "distillery_http_requests_total" in text


def test_compression_specs_are_checked_before_queueing(client, make_key, uploaded):
    h = make_key("jobs-compress")
    m, d = uploaded(h)  # an ONNX classification teacher
    cases = {
        "cannot be trained or pruned further": {"steps": [{"kind": "quantize"}, {"kind": "prune"}]},
        "quantize at most once": {"steps": [{"kind": "quantize"}, {"kind": "quantize", "method": "fp16"}]},
        "onnx_int8": {"steps": [{"kind": "prune", "method": "magnitude", "amount": 0.5}]},
        "'r2' is not measured": {"steps": [{"kind": "quantize", "method": "onnx_int8",
                                            "gate": {"metric": "r2", "max_drop": 0.1}}]},
        "amount": {"steps": [{"kind": "prune", "amount": 1.5}]},
    }
    for needle, body in cases.items():
        r = client.post("/v1/jobs", headers=h, json={"teacher_model_id": m, "dataset_id": d, **body})
        assert r.status_code == 422, (needle, r.text)
        assert needle in r.text, (needle, r.json()["detail"])
    ok = client.post("/v1/jobs", headers=h, json={"teacher_model_id": m, "dataset_id": d, "steps": [
        {"kind": "quantize", "method": "onnx_int8", "gate": {"metric": "accuracy", "max_drop": 0.01}}]})
    assert ok.status_code == 202, ok.text
    assert ok.json()["spec"]["steps"][0]["mode"] == "dynamic"


def test_auto_values_are_stored_and_shown(client, make_key, uploaded):
    """'auto' epochs / lr / temperature are accepted, stored as 'auto' and shown with the epochs' upper bound."""
    h = make_key("jobs-auto")
    m, d = uploaded(h)
    r = client.post("/v1/jobs", headers=h, json={
        "teacher_model_id": m, "dataset_id": d, "student": {"family": "mlp", "hidden": [16]},
        "steps": [{"kind": "distill", "epochs": "auto", "optimizer": {"lr": "auto"},
                   "loss": {"type": "kd", "temperature": "auto"}}]})
    assert r.status_code == 202, r.text
    job = r.json()
    step = job["spec"]["steps"][0]
    assert (step["epochs"], step["optimizer"]["lr"], step["loss"]["temperature"]) == ("auto", "auto", "auto")
    assert job["progress"]["epochs"] == 100
    assert client.get(f"/v1/jobs/{job['id']}", headers=h).json()["progress"]["epochs"] == 100
    bad = client.post("/v1/jobs", headers=h, json={
        "teacher_model_id": m, "dataset_id": d, "student": {"family": "mlp"},
        "steps": [{"kind": "distill", "epochs": "auto", "schedule": {"type": "cosine"}}]})
    assert bad.status_code == 422 and "epochs 'auto'" in bad.text
