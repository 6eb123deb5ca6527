"""jobs.wait (final job, JobFailed / JobCancelled, timeout, progress), and AsyncClient: the same surface."""

from __future__ import annotations

import asyncio
import inspect
import io
import json

import httpx
import pytest

from distillery_client import AsyncClient, Client, JobCancelled, JobFailed, NotFoundError, WaitTimeout
from distillery_client.progress import LinePrinter
from tests.client.mock_api import async_sdk, job, problem, replies, sdk


def progress(epoch: int, fraction: float) -> dict:
    return {"step_index": 0, "step_kind": "distill", "epoch": epoch, "epochs": 4, "fraction": fraction,
            "eta_seconds": 3.0}


RUNNING = [job(status="queued"), job(status="running", progress=progress(1, 0.25)),
           job(status="running", progress=progress(1, 0.25)), job(status="running", progress=progress(3, 0.75))]


def answers(*bodies: dict) -> list[httpx.Response]:
    return [httpx.Response(200, json=b) for b in bodies]


def test_wait_returns_the_succeeded_job_and_reports_each_change():
    final = job(status="succeeded", progress=progress(4, 1.0), metrics={"student": {"accuracy": 0.9}})
    client, rec = sdk(replies(*answers(*RUNNING, final)))
    seen = []
    done = client.jobs.wait("job_1", progress=seen.append, poll_interval=0.2)
    assert done.status == "succeeded" and done.metrics == {"student": {"accuracy": 0.9}}
    assert [(j.status, j.progress and j.progress.epoch) for j in seen] == [
        ("queued", None), ("running", 1), ("running", 3), ("succeeded", 4)]  # the repeat is not reported
    assert rec.sleeps == [0.2] * 4


@pytest.mark.parametrize("status,cls", [("failed", JobFailed), ("cancelled", JobCancelled)])
def test_wait_raises_with_the_jobs_error(status, cls):
    error = {"code": "shape_mismatch" if status == "failed" else "cancelled", "message": "20 features, teacher wants 64"}
    client, _ = sdk(replies(*answers(job(status="running"), job(status=status, error=error))))
    with pytest.raises(cls) as err:
        client.jobs.wait("job_1")
    assert (err.value.code, err.value.message) == (error["code"], error["message"])
    assert err.value.job.status == status


def test_wait_gives_up_after_its_timeout():
    client, _ = sdk(replies(*answers(job(status="running"))))
    with pytest.raises(WaitTimeout) as err:
        client.jobs.wait("job_1", timeout=0)
    assert isinstance(err.value, TimeoutError) and err.value.job.status == "running"


def test_the_line_printer_describes_the_job():
    stream = io.StringIO()
    client, _ = sdk(replies(*answers(RUNNING[1], job(status="succeeded", progress=progress(4, 1.0)))))
    client.jobs.wait("job_1", progress=LinePrinter(stream))
    assert stream.getvalue().splitlines() == ["job_1 running · step 1/1 distill · epoch 1/4 · 25% · ETA 3s",
                                              "job_1 succeeded · 100%"]


def _public(obj) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


def test_async_client_has_the_same_surface():
    sync, asynchronous = Client("http://x"), AsyncClient("http://x")
    for name in ("models", "datasets", "jobs", "artifacts", "webhooks"):
        methods = _public(getattr(sync, name))
        assert methods == _public(getattr(asynchronous, name)) and methods
    assert {"list", "retrieve", "create", "cancel", "events", "metrics", "wait", "artifacts"} <= _public(sync.jobs)
    assert {"upload", "list", "retrieve", "delete"} <= _public(sync.models)
    assert {"upload", "create", "list", "retrieve", "delete"} <= _public(sync.datasets)
    assert {"create", "list", "retrieve", "delete", "test", "deliveries"} <= _public(sync.webhooks)
    assert {"retrieve", "download"} <= _public(sync.artifacts)
    sync.close()
    asyncio.run(asynchronous.close())


def test_async_client_runs_the_same_operations():
    final = job(status="succeeded", progress=progress(4, 1.0))
    page = {"data": [job("job_2"), job("job_1")], "has_more": False, "next_cursor": None}
    events = (b"id: 1\nevent: started\ndata: " + json.dumps({"seq": 1, "type": "started", "message": "m"}).encode()
              + b"\n\nevent: end\ndata: {}\n\n")
    creates = [problem(503, "database_unavailable", "x", headers={"Retry-After": "1"}), httpx.Response(202, json=job())]

    def handler(request: httpx.Request) -> httpx.Response:
        route = f"{request.method} {request.url.path}"
        if route == "POST /v1/jobs":
            return creates.pop(0)
        return {"GET /v1/jobs": httpx.Response(200, json=page),
                "GET /v1/jobs/job_1": httpx.Response(200, json=final),
                "GET /v1/jobs/job_1/events": httpx.Response(200, content=events),
                "GET /v1/jobs/nope": problem(404, "not_found", "job nope not found")}[route]

    async def scenario():
        client, rec = async_sdk(handler)
        async with client:
            created_job = await client.jobs.create({"teacher_model_id": "mdl_1"})
            listed = [j.id async for j in client.jobs.list()]
            seen = []

            async def on_progress(j):  # an async callback is awaited
                seen.append(j.status)

            waited = await client.jobs.wait("job_1", progress=on_progress)
            followed = [e.type async for e in client.jobs.events("job_1", follow=True)]
            with pytest.raises(NotFoundError):
                await client.jobs.retrieve("nope")
            assert inspect.iscoroutine(coro := client.jobs.retrieve("job_1"))
            await coro
        keys = {r.headers.get("idempotency-key") for r in rec.requests if r.method == "POST"}
        return created_job, listed, waited, seen, followed, keys, rec

    created_job, listed, waited, seen, followed, keys, rec = asyncio.run(scenario())
    assert created_job.id == "job_1" and listed == ["job_2", "job_1"] and waited.status == "succeeded"
    assert seen == ["succeeded"] and followed == ["started"]
    assert len(keys) == 1 and rec.sleeps == [1.0]
