"""The whole flow on S3 storage: `distillery run` (API + a real worker) with DISTILLERY_STORAGE_URL=s3://…
against moto's S3 server. Uploads, jobs, a student download; datasets by s3:// and https:// URI that
register and train; and nothing under the data dir's blob folder."""

from __future__ import annotations

import hashlib
import json
import os

import httpx
import pytest

from tests.storage.conftest import AWS_ENV, free_port
from tests.support.embedded import embedded_service
from tests.support.flow import wait_for
from tests.support.jobs import job_body
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow  # trains real jobs end to end


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory):
    data = tmp_path_factory.mktemp("s3-stack")
    port = free_port()
    bucket, data_bucket = s3_server.bucket(), s3_server.bucket()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILLERY_", "AWS_"))}
    env.update(AWS_ENV, DISTILLERY_DATA_DIR=str(data), DISTILLERY_PORT=str(port), DISTILLERY_WORKER_THREADS="1",
               DISTILLERY_DEVICE="cpu", DISTILLERY_CHECKPOINT_SECONDS="0",
               DISTILLERY_STORAGE_URL=f"s3://{bucket}/distillery", DISTILLERY_S3_ENDPOINT_URL=s3_server.url,
               DISTILLERY_S3_ADDRESSING_STYLE="path", DISTILLERY_S3_MULTIPART_THRESHOLD_BYTES=str(5 * 1024**2),
               DISTILLERY_S3_MULTIPART_CHUNK_BYTES=str(5 * 1024**2),
               DISTILLERY_ALLOWED_S3_BUCKETS=json.dumps([data_bucket]),
               DISTILLERY_ALLOWED_HTTP_HOSTS='["127.0.0.1"]', DISTILLERY_DATASET_ALLOW_HTTP="true")
    with embedded_service(env, data, port, "s3") as service, \
            httpx.Client(base_url=service["url"], headers={"Authorization": f"Bearer {service['key']}"},
                         timeout=60) as http:
        yield {**service, "http": http, "bucket": bucket, "data_bucket": data_bucket}


def _keys(s3_server, bucket: str) -> list[str]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _train(http: httpx.Client, model_id: str, dataset_id: str) -> dict:
    r = http.post("/v1/jobs", json=job_body(model_id, dataset_id, steps=[{"kind": "distill", "epochs": 3}],
                                            exports=["onnx"]))
    assert r.status_code == 202, r.text
    job = wait_for(http, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    return job


def _events(http: httpx.Client, job_id: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in http.get(f"/v1/jobs/{job_id}/events").json()["data"]:
        out.setdefault(e["type"], []).append(e)
    return out


def test_the_whole_flow_on_s3(stack, s3_server, file_server, teacher_files, digits_npz):
    http, bucket = stack["http"], stack["bucket"]
    teacher = teacher_files["onnx"].read_bytes()
    m = http.post("/v1/models", files={"file": ("teacher.onnx", teacher)}, data={"name": "teacher"})
    d = http.post("/v1/datasets", files={"file": ("d.npz", digits_npz)}, data={"name": "digits", "format": "npz"})
    assert m.status_code == 201 and d.status_code == 201, (m.text, d.text)
    model_id, dataset_id = m.json()["id"], d.json()["id"]
    assert {f"distillery/models/{model_id}", f"distillery/datasets/{dataset_id}"} <= set(_keys(s3_server, bucket))

    # 1. Uploaded teacher and dataset → a job → the student, downloaded through the API.
    job = _train(http, model_id, dataset_id)
    events = _events(http, job["id"])
    assert events["inputs_fetched"][0]["data"]["downloaded"] == 2  # from the bucket into the worker's cache
    assert events.get("checkpoint_saved"), "checkpoints were written (and pushed to the bucket)"
    arts = http.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    student = next(a for a in arts if a["kind"] == "student" and a["format"] == "onnx")
    content = http.get(f"/v1/artifacts/{student['id']}/content")
    assert content.status_code == 200 and hashlib.sha256(content.content).hexdigest() == student["sha256"]
    part = http.get(f"/v1/artifacts/{student['id']}/content", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == content.content[:100]
    import onnxruntime as ort

    sess = ort.InferenceSession(content.content, providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[-1] == 64  # the digits student, loadable as delivered

    # 2. A dataset by s3:// URI (another, allow-listed bucket) registers and trains; the teacher comes from the cache.
    s3_server.client().put_object(Bucket=stack["data_bucket"], Key="in/digits.npz", Body=digits_npz)
    sha = hashlib.sha256(digits_npz).hexdigest()
    r = http.post("/v1/datasets", json={"name": "by-s3", "uri": f"s3://{stack['data_bucket']}/in/digits.npz",
                                        "format": "npz", "sha256": sha})
    assert r.status_code == 201 and r.json()["num_rows"] > 0, r.text
    job = _train(http, model_id, r.json()["id"])
    fetched = _events(http, job["id"])["inputs_fetched"][0]["data"]
    assert (fetched["downloaded"], fetched["cached"]) == (0, 2)  # same bytes, same sha256: nothing downloaded

    # 3. A dataset by http(s):// URI on an allow-listed host registers and trains.
    file_server.files["/e2e/digits.npz"] = digits_npz
    r = http.post("/v1/datasets", json={"name": "by-http", "uri": file_server.url("/e2e/digits.npz"),
                                        "format": "npz"})
    assert r.status_code == 201 and r.json()["sha256"] == sha, r.text
    _train(http, model_id, r.json()["id"])

    # 4. Not allow-listed: 422 with a precise detail.
    for uri in (f"s3://{bucket}-nope/in/digits.npz", file_server.url("/e2e/digits.npz", host="localhost")):
        r = http.post("/v1/datasets", json={"name": "refused", "uri": uri, "format": "npz"})
        assert r.status_code == 422 and r.json()["code"] == "uri_not_allowed", r.text

    # Everything lives in the bucket; the data dir holds the database, queue, scratch and cache, no blobs.
    # Checkpoints are deleted by the worker right after each job's own terminal transition: wait for it.
    wait_until(lambda: not [k for k in _keys(s3_server, bucket) if k.startswith("distillery/checkpoints/")],
               30, "the ended jobs' checkpoints to be deleted from the bucket")
    keys = _keys(s3_server, bucket)
    assert sum(k.startswith("distillery/artifacts/") for k in keys) >= 3 * 2  # student + report per job
    assert not (stack["data"] / "blobs").exists()
    assert len(list((stack["data"] / "cache" / "blobs").glob("[0-9a-f]" * 64))) == 2
    assert "Traceback" not in stack["log"].read_text(errors="replace")
