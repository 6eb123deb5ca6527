"""``client.jobs``: create, watch, cancel distillation jobs — ``/v1/jobs``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from distillery_client._flow import Close, Emit, Flow, Notify, Read, Sleep
from distillery_client._sse import SSEDecoder
from distillery_client.errors import APIConnectionError, JobCancelled, JobFailed, WaitTimeout
from distillery_client.progress import LinePrinter
from distillery_client.resources._base import MAX_PAGE_SIZE, Resource, idempotency_headers, object_id
from distillery_client.types import Artifact, Event, Job, MetricPoint

#: Events per page of ``GET /v1/jobs/{id}/events`` (the server's maximum).
EVENTS_PAGE = 1000

ProgressCallback = Callable[[Job], Any]


class Jobs(Resource):
    def create(self, spec: dict[str, Any] | None = None, /, *, idempotency_key: str | None = None,
               **fields: Any) -> Job:
        """Submit a job: ``spec`` (the JSON body, see the API reference) and/or its fields as keywords
        (``teacher_model_id=..., dataset_id=..., student=..., steps=[...]``); keywords win. The job is queued
        (202); :meth:`wait` follows it. One ``Idempotency-Key`` for all retries: never two jobs."""
        body = {**(spec or {}), **fields}
        return self._run(self._call("POST", "/v1/jobs", Job.from_dict, json=body,
                                    headers=idempotency_headers(idempotency_key)))

    def retrieve(self, job_id: str | Job) -> Job:
        return self._run(self._call("GET", f"/v1/jobs/{object_id(job_id)}", Job.from_dict))

    def list(self, *, status: str | None = None, kind: str | None = None, page_size: int = MAX_PAGE_SIZE,
             max_items: int | None = None) -> Iterator[Job]:
        """Your jobs, newest first, following the cursors; ``status`` (queued, running, ...) and ``kind``
        (a step kind: ``distill`` matches ``distill+quantize``) filter them."""
        return self._iter(self._pages("/v1/jobs", Job.from_dict, {"status": status, "kind": kind}, page_size,
                                      max_items))

    def cancel(self, job_id: str | Job) -> Job:
        """Ask the job to stop (idempotent); a finished job answers 409 :class:`~distillery_client.ConflictError`."""
        return self._run(self._call("POST", f"/v1/jobs/{object_id(job_id)}/cancel", Job.from_dict))

    def events(self, job_id: str | Job, *, follow: bool = False, after: int = 0) -> Iterator[Event]:
        """The job's events after ``after`` (a seq). ``follow=True`` reads the live stream (server-sent events)
        until the job ends, reconnecting from the last event seen when the connection drops."""
        path = f"/v1/jobs/{object_id(job_id)}/events"
        return self._iter(self._follow(path, after) if follow else self._event_pages(path, after))

    def metrics(self, job_id: str | Job) -> list[MetricPoint]:
        """The time series (per step and epoch: losses, held-out metrics)."""
        return self._run(self._items(f"/v1/jobs/{object_id(job_id)}/metrics", MetricPoint.from_dict))

    def artifacts(self, job_id: str | Job) -> list[Artifact]:
        """The files the job produced (students, report, model card, plots); download with
        ``client.artifacts.download``."""
        return self._run(self._items(f"/v1/jobs/{object_id(job_id)}/artifacts", Artifact.from_dict))

    def wait(self, job_id: str | Job, *, timeout: float | None = None,
             progress: bool | ProgressCallback = False, poll_interval: float = 1.0) -> Job:
        """Poll until the job ends; return it when it succeeded. Raises :class:`~distillery_client.JobFailed`
        (``code``, ``message``) when it failed, :class:`~distillery_client.JobCancelled` when cancelled, and
        :class:`~distillery_client.WaitTimeout` after ``timeout`` seconds. ``progress``: a callback called with
        the job at each change (with AsyncClient it may be a coroutine function), or True to print a line."""
        callback = LinePrinter() if progress is True else (progress or None)
        return self._run(self._wait(object_id(job_id), timeout, callback, poll_interval))

    def _wait(self, job_id: str, timeout: float | None, callback: ProgressCallback | None,
              poll_interval: float) -> Flow[Job]:
        began, seen = time.monotonic(), None
        while True:
            job = yield from self._call("GET", f"/v1/jobs/{job_id}", Job.from_dict)
            state = (job.status, job.raw.get("progress"))
            if callback is not None and state != seen:
                seen = state
                yield Notify(callback, job)
            if job.done:
                break
            left = None if timeout is None else timeout - (time.monotonic() - began)
            if left is not None and left <= 0:
                raise WaitTimeout(job, timeout)  # type: ignore[arg-type]
            yield Sleep(poll_interval if left is None else min(poll_interval, left))
        if job.status == "succeeded":
            return job
        raise (JobCancelled if job.status == "cancelled" else JobFailed)(job)

    def _event_pages(self, path: str, after: int) -> Flow[None]:
        while True:
            page = yield from self._items(path, Event.from_dict, params={"after": after, "limit": EVENTS_PAGE})
            for event in page:
                after = event.seq
                yield Emit(event)
            if len(page) < EVENTS_PAGE:
                return

    def _follow(self, path: str, after: int) -> Flow[None]:
        """The event stream: ``id: seq / event: type / data: {event}`` blocks, keep-alive comments, and a final
        ``event: end``. A stream that drops (or ends without ``end``) is reopened from the last seq seen; after
        ``max_retries`` drops in a row without an event in between, :class:`APIConnectionError`."""
        drops = 0
        while True:
            response = yield from self._open(path, params={"after": after}, headers={"Accept": "text/event-stream"})
            decoder = SSEDecoder()
            try:
                while chunk := (yield Read(response)):
                    for sse in decoder.feed(chunk):
                        if sse.event == "end":
                            return
                        if not sse.data:
                            continue
                        event = Event.from_dict(json.loads(sse.data))
                        after, drops = max(after, event.seq), 0
                        yield Emit(event)
                dropped: Exception = httpx.RemoteProtocolError("the event stream ended before the job did")
            except httpx.TransportError as exc:
                dropped = exc
            yield Close(response)
            drops += 1
            if drops > self._policy.max_retries:
                raise APIConnectionError(f"GET {path}: the event stream dropped {drops} times in a row: "
                                         f"{type(dropped).__name__}: {dropped}") from dropped
            yield Sleep(self._policy.backoff(drops - 1))
