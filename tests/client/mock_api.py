"""A scripted API for the SDK's unit tests: httpx.MockTransport handlers, problem bodies, recorded requests.

The SDK runs unchanged on top (its real httpx clients, a mock transport underneath); only ``sleep`` is
replaced, by a recorder, so retry waits are asserted instead of waited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from distillery_client import AsyncClient, Client, RetryPolicy

URL = "http://distillery.test"


def problem(status: int, code: str, detail: str, errors: list[dict] | None = None,
            headers: dict[str, str] | None = None) -> httpx.Response:
    """An error response the way the server writes it (app/errors.py)."""
    body: dict[str, Any] = {"type": f"https://distillery.dev/problems/{code}", "title": "t", "status": status,
                            "detail": detail, "code": code}
    if errors is not None:
        body["errors"] = errors
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json", **(headers or {})})


def job(job_id: str = "job_1", status: str = "queued", **fields: Any) -> dict[str, Any]:
    return {"id": job_id, "status": status, "created_at": "2025-01-01T00:00:00Z", "started_at": None,
            "finished_at": None, "spec": {"steps": [{"kind": "distill"}]}, "progress": None, "metrics": None,
            "error": None, "attempts": 0, **fields}


class Recorder:
    """The requests seen and the sleeps asked for."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def async_sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(0)

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]


def sdk(handler: Callable[[httpx.Request], httpx.Response], max_retries: int = 3, *,
        asynchronous: bool = False) -> tuple[Any, Recorder]:
    """A Client (an AsyncClient with ``asynchronous``) whose requests go to ``handler``; the Recorder sees them
    (and the retry sleeps)."""
    rec = Recorder()

    def record(request: httpx.Request) -> httpx.Response:
        rec.requests.append(request)
        return handler(request)

    cls, sleep = (AsyncClient, rec.async_sleep) if asynchronous else (Client, rec.sleep)
    client = cls(URL, "key-1", transport=httpx.MockTransport(record), sleep=sleep,
                 retry=RetryPolicy(max_retries=max_retries))
    return client, rec


def async_sdk(handler: Callable[[httpx.Request], httpx.Response], max_retries: int = 3) -> tuple[AsyncClient, Recorder]:
    return sdk(handler, max_retries, asynchronous=True)


def replies(*responses: httpx.Response | Exception) -> Callable[[httpx.Request], httpx.Response]:
    """A handler answering with ``responses`` in turn (an exception is raised, as the transport would)."""
    queue: Iterator[httpx.Response | Exception] = iter(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(queue)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler


def chunks(*parts: bytes, then: Exception | None = None) -> Iterator[bytes]:
    """A streamed body: ``parts`` one by one, then ``then`` raised (a connection dropped mid-body)."""
    yield from parts
    if then is not None:
        raise then
