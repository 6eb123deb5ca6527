"""Issue-3 methods through the real service: several datasets per job, uploaded students, options, data-free."""

from __future__ import annotations

import io
import json

import pytest

from tests.support.flow import wait_for
from tests.support.teachers import npz_bytes

pytestmark = pytest.mark.integration


def _model(http, content: bytes, filename: str, **fields) -> str:
    r = http.post("/v1/models", files={"file": (filename, content)}, data={"name": filename, **fields})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _dataset(http, content: bytes, fmt: str = "npz", **fields) -> str:
    r = http.post("/v1/datasets", files={"file": (f"d.{fmt}", content)}, data={"name": "d", "format": fmt, **fields})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _report(http, job_id: str) -> dict:
    arts = http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    report = next(a for a in arts if a["kind"] == "report")
    return json.loads(http.get(f"/v1/artifacts/{report['id']}/content").content)


@pytest.mark.slow  # trains a whole job to an accuracy floor
def test_two_stage_regime_on_csv_and_npz_then_baseline(http, teacher_files, digits):
    """Pre-train on unlabeled transfer data (npz), fine-tune on labeled csv; a baseline job proves the gain."""
    teacher = _model(http, teacher_files["torchscript"].read_bytes(), "t.pt")
    unlabeled = _dataset(http, npz_bytes(x=digits.x_train[:800]))
    header = ",".join([f"px{i}" for i in range(64)] + ["digit"])
    lines = [header] + [",".join(f"{v:.5f}" for v in x) + f",{y}" for x, y in zip(digits.x_train, digits.y_train)]
    labeled = _dataset(http, ("\n".join(lines) + "\n").encode(), "csv", label_column="digit")
    body = {"teacher_model_id": teacher, "dataset_id": labeled, "student": {"family": "mlp", "hidden": [32]},
            "steps": [{"kind": "distill", "dataset_id": unlabeled, "loss": {"type": "kd"}, "epochs": 20,
                       "optimizer": {"type": "adamw", "lr": 0.01}},
                      {"kind": "distill", "loss": {"type": "kd", "alpha": 0.5}, "epochs": 20}],
            "exports": ["onnx"]}
    refused = http.post("/v1/jobs", json={**body, "baseline": True})  # step 0's data has no labels to train on
    assert refused.status_code == 422 and "steps[0]" in refused.json()["detail"]
    job = http.post("/v1/jobs", json=body).json()
    final = wait_for(http, job["id"], timeout=240)
    assert final["status"] == "succeeded", final["error"]
    report = _report(http, job["id"])
    assert len(report["steps"]) == 2 and report["student"]["accuracy"] >= 0.9
    assert [s["data"]["dataset"] for s in report["steps"]] == [unlabeled, labeled]

    job = http.post("/v1/jobs", json={**body, "steps": body["steps"][1:], "baseline": True}).json()
    final = wait_for(http, job["id"], timeout=240)
    assert final["status"] == "succeeded", final["error"]
    report = _report(http, job["id"])
    assert "accuracy" in report["baseline"] and "accuracy" in report["teacher_gain"]


@pytest.mark.slow  # trains a whole job to an accuracy floor
def test_safetensors_teacher_and_uploaded_student(http, digits, tmp_path):
    import torch
    from safetensors.torch import save_file

    from tests.support.teachers import train_mlp_teacher

    teacher = train_mlp_teacher(digits, epochs=20)
    weights = {f"{int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}": v for k, v in teacher.state_dict().items()}
    path = tmp_path / "t.safetensors"
    save_file(weights, str(path))
    arch = {"family": "mlp", "in_features": 64, "hidden": [256, 256], "out_features": 10}
    teacher_id = _model(http, path.read_bytes(), "t.safetensors", architecture=json.dumps(arch))
    student = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.ReLU(), torch.nn.Linear(24, 10))
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(student), buf)
    student_id = _model(http, buf.getvalue(), "s.pt")
    data = _dataset(http, npz_bytes(x=digits.x_train, y=digits.y_train, x_val=digits.x_test, y_val=digits.y_test))
    job = http.post("/v1/jobs", json={"teacher_model_id": teacher_id, "dataset_id": data,
                                      "student": {"model_id": student_id},
                                      "steps": [{"kind": "distill", "epochs": 40,
                                                 "optimizer": {"type": "adamw", "lr": 0.01}}]}).json()
    final = wait_for(http, job["id"], timeout=240)
    assert final["status"] == "succeeded", final["error"]
    assert final["metrics"]["student"]["accuracy"] >= 0.85
    # Once the job has finished, the uploaded student may be deleted.
    assert http.delete(f"/v1/models/{student_id}").status_code == 204


@pytest.mark.slow  # trains a whole job to an accuracy floor
def test_data_free_job_scored_on_real_digits(http, teacher_files, digits):
    teacher = _model(http, teacher_files["torchscript"].read_bytes(), "t.pt")
    real = _dataset(http, npz_bytes(x=digits.x_test, y=digits.y_test))
    job = http.post("/v1/jobs", json={
        "teacher_model_id": teacher, "eval_dataset_id": real, "input_spec": {"shape": [64], "range": [0.0, 1.0]},
        "student": {"family": "mlp", "hidden": [32]},
        "steps": [{"kind": "distill", "epochs": 20,
                   "synthesize": {"method": "generator", "num_samples": 4000, "generator_epochs": 20}}],
        "exports": ["torchscript"]}).json()
    assert "id" in job, job
    final = wait_for(http, job["id"], timeout=300)
    assert final["status"] == "succeeded", final["error"]
    assert final["metrics"]["student"]["accuracy"] >= 0.5


def test_incompatible_specs_are_refused_before_queueing(http, teacher_files, digits):
    onnx_teacher = _model(http, teacher_files["onnx"].read_bytes(), "t.onnx")
    unlabeled = _dataset(http, npz_bytes(x=digits.x_train[:100]))
    r = http.post("/v1/jobs", json={"teacher_model_id": onnx_teacher, "input_spec": {"shape": [64]},
                                    "student": {"family": "mlp"}, "steps": [{"kind": "distill", "synthesize": {}}]})
    assert r.status_code == 422 and "torch teacher" in r.json()["detail"]
    r = http.post("/v1/jobs", json={"teacher_model_id": onnx_teacher, "dataset_id": unlabeled, "baseline": True,
                                    "student": {"family": "mlp"}})
    assert r.status_code == 422 and "labels" in r.json()["detail"]
    r = http.post("/v1/jobs", json={"teacher_model_id": onnx_teacher, "dataset_id": unlabeled,
                                    "student": {"family": "mlp"}, "steps": [{"kind": "distill",
                                                                             "loss": {"type": "cosine"}}]})
    assert r.status_code == 422 and r.json()["code"] == "incompatible_spec"
