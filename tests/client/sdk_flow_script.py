"""Run by tests/client/test_e2e.py with the Python of a venv that holds distillery-client and nothing of the
server (no torch): the whole flow through the SDK against a real API and worker. Prints one JSON summary.

Arguments: TEACHER.pt DIGITS.npz OUT_DIR. The server's URL and key come from DISTILLERY_URL / DISTILLERY_API_KEY.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import httpx

from distillery_client import AsyncClient, Client

teacher_path, npz_path, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
absent = {name: importlib.util.find_spec(name) is None for name in ("torch", "app", "worker", "engine", "jobspec")}


class Recording(httpx.HTTPTransport):
    """The real transport, noting each request's Range header (to show a download resumed)."""

    ranges: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/content"):
            self.ranges.append(request.headers.get("range"))
        return super().handle_request(request)


with Client(transport=Recording()) as client:
    model = client.models.upload(teacher_path, name="digits-teacher")
    data = client.datasets.upload(npz_path, name="digits", format="npz")
    job = client.jobs.create(
        teacher_model_id=model.id, dataset_id=data.id, student={"family": "mlp", "hidden": [32]},
        steps=[{"kind": "distill", "loss": {"type": "kd", "temperature": 4.0, "alpha": 0.9}, "epochs": 1,
                "batch_size": 64, "optimizer": {"type": "adamw", "lr": 0.003}}],
        exports=["torchscript"], seed=0)
    seen: list[list] = []
    final = client.jobs.wait(job.id, timeout=120, poll_interval=0.2, progress=lambda j: seen.append(
        [j.status, j.progress.fraction if j.progress else None]))
    followed = [[e.seq, e.type] for e in client.jobs.events(job.id, follow=True)]
    paged = [[e.seq, e.type] for e in client.jobs.events(job.id)]
    artifacts = client.jobs.artifacts(job.id)
    student = next(a for a in artifacts if a.kind == "student")
    downloaded = client.artifacts.download(student, out / "whole")
    # An interrupted download: half the bytes already on disk; the rest comes with Range and is verified.
    resumed_dir = out / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / (student.filename + ".part")).write_bytes(downloaded.read_bytes()[:student.size_bytes // 2])
    resumed = client.artifacts.download(student.id, resumed_dir)
    listed = [j.id for j in client.jobs.list(status="succeeded")]
    metrics = client.jobs.metrics(job.id)


async def async_view() -> list:
    async with AsyncClient() as aclient:
        again = await aclient.jobs.retrieve(job.id)
        newest = [j.id async for j in aclient.jobs.list(max_items=1)]
        return [again.status, newest, [a.id for a in await aclient.jobs.artifacts(job.id)]]


print(json.dumps({
    "absent": absent, "model_id": model.id, "dataset_id": data.id, "job_id": job.id, "status": final.status,
    "student_accuracy": (final.metrics or {}).get("student", {}).get("accuracy"), "progress": seen,
    "followed": followed, "paged": paged, "artifact_ids": [a.id for a in artifacts],
    "student": {"sha256": student.sha256, "size_bytes": student.size_bytes},
    "downloaded": str(downloaded), "downloaded_sha256": hashlib.sha256(downloaded.read_bytes()).hexdigest(),
    "resumed": str(resumed), "resumed_sha256": hashlib.sha256(resumed.read_bytes()).hexdigest(),
    "ranges": Recording.ranges, "listed": listed, "metric_names": sorted({m.name for m in metrics}),
    "async": asyncio.run(async_view()),
}))
