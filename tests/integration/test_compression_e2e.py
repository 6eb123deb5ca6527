"""Compression through the real service: a distill → prune → quantize pipeline with gates, and a gate that trips."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from tests.support.flow import upload_inputs, wait_for

pytestmark = pytest.mark.integration


def _artifacts(http, job_id: str) -> list[dict]:
    return http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]


def _content(http, art: dict) -> bytes:
    r = http.get(f"/v1/artifacts/{art['id']}/content")
    assert r.status_code == 200
    return r.content


def _torchscript_accuracy(blob: bytes, digits) -> float:
    import torch

    model = torch.jit.load(io.BytesIO(blob))
    with torch.inference_mode():
        pred = model(torch.from_numpy(digits.x_test)).argmax(1).numpy()
    return float((pred == digits.y_test).mean())


@pytest.mark.slow  # trains a whole job to an accuracy floor
def test_pipeline_with_passing_gates_reports_every_step(http, teacher_files, digits):
    model_id, dataset_id = upload_inputs(http, teacher_files["torchscript"], digits)
    job = http.post("/v1/jobs", json={
        "teacher_model_id": model_id, "dataset_id": dataset_id, "student": {"family": "mlp", "hidden": [64]},
        "steps": [{"kind": "distill", "epochs": 30, "optimizer": {"type": "adamw", "lr": 0.01},
                   "gate": {"metric": "accuracy", "max_drop": 0.05}},
                  {"kind": "prune", "method": "magnitude", "amount": 0.5, "finetune": {"epochs": 2},
                   "gate": {"metric": "accuracy", "max_drop": 0.05}},
                  {"kind": "quantize", "method": "dynamic_int8", "gate": {"metric": "accuracy", "max_drop": 0.05}}],
        "exports": ["torchscript", "onnx"]}).json()
    final = wait_for(http, job["id"], timeout=300)
    assert final["status"] == "succeeded", final["error"]
    arts = _artifacts(http, job["id"])
    report = json.loads(_content(http, next(a for a in arts if a["kind"] == "report")))
    assert [r["kind"] for r in report["steps"]] == ["distill", "prune", "quantize"]
    for row in report["steps"]:
        for key in ("num_parameters", "nonzero_parameters", "size_bytes", "size_gzip_bytes", "latency_ms",
                    "accuracy", "agreement"):
            assert key in row, (row["kind"], key)
    assert report["steps"][1]["nonzero_parameters"] < report["steps"][0]["nonzero_parameters"]
    assert report["steps"][2]["size_bytes"] < report["steps"][1]["size_bytes"]
    # Every step's output is delivered; each TorchScript re-loads and scores what the report says.
    scripts = {a["step_index"]: a for a in arts if a["kind"] == "student" and a["format"] == "torchscript"}
    assert set(scripts) == {0, 1, 2}
    for index, art in scripts.items():
        row = report["steps"][index]
        assert abs(_torchscript_accuracy(_content(http, art), digits) - row["accuracy"]) < 1e-9, index
    kinds = {a["kind"] for a in arts}
    assert {"model_card", "plot"} <= kinds


def test_gate_that_trips_fails_the_job_and_keeps_the_last_good_step(http, teacher_files, digits):
    model_id, dataset_id = upload_inputs(http, teacher_files["torchscript"], digits)
    job = http.post("/v1/jobs", json={
        "teacher_model_id": model_id, "dataset_id": dataset_id, "student": {"family": "mlp", "hidden": [64]},
        "steps": [{"kind": "distill", "epochs": 20},
                  {"kind": "prune", "method": "random", "amount": 0.95, "gate": {"metric": "accuracy", "max_drop": 0.0}}],
        "exports": ["torchscript"]}).json()
    final = wait_for(http, job["id"], timeout=300)
    assert final["status"] == "failed" and final["error"]["code"] == "quality_gate", final
    assert "step 1" in final["error"]["message"]
    arts = _artifacts(http, job["id"])
    students = [a for a in arts if a["kind"] == "student"]
    assert students and {a["step_index"] for a in students} == {0}
    report = json.loads(_content(http, next(a for a in arts if a["kind"] == "report")))
    assert report["gate"]["failed_step"] == 1 and report["gate"]["drop"] > 0
    assert np.isclose(_torchscript_accuracy(_content(http, students[0]), digits), report["steps"][0]["accuracy"])
