"""The client-side flow every integration test walks: upload, submit, poll, download, verify."""

from __future__ import annotations

import io
import json
import time

import httpx
import numpy as np

from tests.support.teachers import Digits, npz_bytes

TERMINAL = {"succeeded", "failed", "cancelled"}


def wait_http(base_url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{base_url} did not come up within {timeout}s")


def wait_for(http: httpx.Client, job_id: str, until: set[str] = TERMINAL, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")


def upload_inputs(http: httpx.Client, teacher_path, d: Digits) -> tuple[str, str]:
    m = http.post("/v1/models", files={"file": (teacher_path.name, teacher_path.read_bytes())},
                  data={"name": f"digits-{teacher_path.suffix}"})
    assert m.status_code == 201, m.text
    ds = http.post("/v1/datasets", files={"file": ("digits.npz", npz_bytes(x=d.x_train, y=d.y_train, x_val=d.x_test,
                                                                             y_val=d.y_test))},
                   data={"name": "digits", "format": "npz"})
    assert ds.status_code == 201, ds.text
    return m.json()["id"], ds.json()["id"]


def distill_digits(http: httpx.Client, teacher_path, d: Digits, epochs: int = 30) -> tuple[dict, dict[str, bytes]]:
    """Run a KD job into mlp[32] on digits; returns (final job, {artifact format/kind: bytes})."""
    model_id, dataset_id = upload_inputs(http, teacher_path, d)
    r = http.post("/v1/jobs", json={
        "teacher_model_id": model_id, "dataset_id": dataset_id, "student": {"family": "mlp", "hidden": [32]},
        "steps": [{"kind": "distill", "loss": {"type": "kd", "temperature": 4.0, "alpha": 0.9}, "epochs": epochs,
                   "batch_size": 64, "optimizer": {"type": "adamw", "lr": 0.003}}],
        "seed": 0})
    assert r.status_code == 202, r.text
    job = wait_for(http, r.json()["id"])
    assert job["status"] == "succeeded", job
    files = {}
    for art in http.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]:
        content = http.get(f"/v1/artifacts/{art['id']}/content")
        assert content.status_code == 200 and content.headers["etag"] == f'"{art["sha256"]}"'
        files[f"{art['kind']}:{art['format']}"] = content.content
    return job, files


def check_student_files(files: dict[str, bytes], d: Digits, min_accuracy: float = 0.90) -> dict:
    """Load the delivered student with plain torch / onnxruntime; both must agree and be accurate."""
    import onnxruntime as ort
    import torch

    assert {"student:torchscript", "student:onnx", "student:safetensors", "report:json"} <= set(files)
    scripted = torch.jit.load(io.BytesIO(files["student:torchscript"]))
    with torch.inference_mode():
        ts_pred = scripted(torch.from_numpy(d.x_test)).argmax(1).numpy()
    accuracy = float((ts_pred == d.y_test).mean())
    assert accuracy >= min_accuracy, accuracy
    sess = ort.InferenceSession(files["student:onnx"], providers=["CPUExecutionProvider"])
    onnx_pred = sess.run(None, {sess.get_inputs()[0].name: d.x_test})[0].argmax(1)
    assert np.array_equal(onnx_pred, ts_pred)
    report = json.loads(files["report:json"])
    for key in ("teacher", "steps", "student", "compression_ratio", "speedup", "reproducibility"):
        assert key in report, key
    for row in (report["teacher"], report["student"]):
        assert row["num_parameters"] > 0 and row["size_bytes"] > 0
        assert row["latency_ms"]["batch_1"] > 0 and row["latency_ms"]["batch_32"] > 0
    assert report["student"]["num_parameters"] < report["teacher"]["num_parameters"]
    assert abs(report["student"]["accuracy"] - accuracy) < 1e-6  # the report tells the truth about the file
    return report
