"""``Client`` (blocking) and ``AsyncClient`` (asyncio): one surface, two drivers."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from distillery_client._drivers import AsyncDriver, SyncDriver
from distillery_client._http import RetryPolicy
from distillery_client._version import __version__
from distillery_client.resources import Artifacts, Datasets, Jobs, Models, Webhooks
from distillery_client.resources._base import Resource, Runner

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0


def connection(base_url: str | None, api_key: str | None,
               headers: dict[str, str] | None) -> tuple[str, dict[str, str]]:
    """The server's URL and the headers every request carries; ``DISTILLERY_URL`` / ``DISTILLERY_API_KEY``
    fill in what the caller left out."""
    url = (base_url or os.environ.get("DISTILLERY_URL") or DEFAULT_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get("DISTILLERY_API_KEY")
    out = {"User-Agent": f"distillery-client/{__version__}", "Accept": "application/json", **(headers or {})}
    if key:
        out["Authorization"] = f"Bearer {key}"
    return url, out


class _Surface:
    """The resources, attached to a driver. Resource methods return values with :class:`Client`, awaitables
    (and async iterators instead of iterators) with :class:`AsyncClient`."""

    models: Models
    datasets: Datasets
    jobs: Jobs
    artifacts: Artifacts
    webhooks: Webhooks

    def _connect(self, http_class: Any, base_url: str | None, api_key: str | None, headers: dict[str, str] | None,
                 timeout: float | httpx.Timeout, transport: Any) -> Any:
        self.base_url, request_headers = connection(base_url, api_key, headers)
        return http_class(base_url=self.base_url, headers=request_headers, timeout=timeout, transport=transport)

    def _attach(self, runner: Runner, policy: RetryPolicy) -> None:
        self._runner = runner
        self._api = Resource(runner, policy)
        self.models = Models(runner, policy)
        self.datasets = Datasets(runner, policy)
        self.jobs = Jobs(runner, policy)
        self.artifacts = Artifacts(runner, policy)
        self.webhooks = Webhooks(runner, policy)

    def capabilities(self) -> dict[str, Any]:
        """What this deployment offers: step kinds, methods, losses, student families, formats, exports."""
        return self._runner.run(self._api._call("GET", "/v1/capabilities", dict))


class Client(_Surface):
    """The Distillery API, blocking.

    ``base_url`` / ``api_key`` default to ``DISTILLERY_URL`` (else ``http://127.0.0.1:8000``) and
    ``DISTILLERY_API_KEY``. ``timeout``: seconds for each connect / read / write. ``max_retries``: attempts
    after the first on connection errors, 429 and 5xx (backoff with jitter, ``Retry-After`` honoured);
    ``retry`` sets the whole policy. ``transport`` (an httpx transport) and ``sleep`` are for tests and
    custom networking. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, max_retries: int = 3,
                 retry: RetryPolicy | None = None, headers: dict[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] | None = None):
        self._http = self._connect(httpx.Client, base_url, api_key, headers, timeout, transport)
        self._attach(SyncDriver(self._http, sleep), retry or RetryPolicy(max_retries=max_retries))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Surface):
    """The Distillery API for asyncio: the same resources and arguments as :class:`Client`; every method is
    awaited (``await client.jobs.wait(job.id)``) and the listing ones are async iterators
    (``async for job in client.jobs.list()``)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, max_retries: int = 3,
                 retry: RetryPolicy | None = None, headers: dict[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[Any]] | None = None):
        self._http = self._connect(httpx.AsyncClient, base_url, api_key, headers, timeout, transport)
        self._attach(AsyncDriver(self._http, sleep), retry or RetryPolicy(max_retries=max_retries))

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
