"""What every resource shares: running its operations on the client's driver, one call, a paginated list."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Protocol

import httpx

from distillery_client._flow import Emit, Flow, HttpRequest, T
from distillery_client._http import RetryPolicy, send

#: Most items the API returns per page.
MAX_PAGE_SIZE = 100


class Runner(Protocol):
    """A driver (``_drivers.py``): runs an operation to its value, or iterates what it emits.

    With :class:`~distillery_client.AsyncClient` the first returns an awaitable and the second an async
    iterator; that is the only difference between the two clients' resources."""

    def run(self, flow: Flow[T]) -> Any: ...

    def iterate(self, flow: Flow[Any]) -> Any: ...


def idempotency_headers(key: str | None) -> dict[str, str]:
    """The ``Idempotency-Key`` of one create call: the caller's, or a new random one. Made once per call, so
    all the call's retries carry the same key and the server creates the resource at most once."""
    return {"Idempotency-Key": key or f"dc-{uuid.uuid4()}"}


def object_id(value: Any) -> str:
    """An id, or the ``id`` of a response object passed instead."""
    return value if isinstance(value, str) else value.id


class Resource:
    def __init__(self, runner: Runner, policy: RetryPolicy):
        self._runner = runner
        self._policy = policy

    def _run(self, flow: Flow[Any]) -> Any:
        return self._runner.run(flow)

    def _iter(self, flow: Flow[Any]) -> Any:
        return self._runner.iterate(flow)

    def _call(self, method: str, path: str, parse: Callable[[Any], T] | None = None, **request: Any) -> Flow[T]:
        """One request (with retries); its JSON body through ``parse`` (None for an empty answer)."""
        response = yield from send(HttpRequest(method, path, **request), self._policy)
        if parse is None or response.status_code == 204 or not response.content:
            return None  # type: ignore[return-value]
        return parse(response.json())

    def _open(self, path: str, **request: Any) -> Flow[httpx.Response]:
        """A streamed GET (with retries): the response, its body still to be read with ``Read`` effects."""
        return (yield from send(HttpRequest("GET", path, stream=True, **request), self._policy))

    def _pages(self, path: str, parse: Callable[[dict], Any], params: dict[str, Any] | None = None,
               page_size: int = MAX_PAGE_SIZE, max_items: int | None = None) -> Flow[None]:
        """Emit every item of a cursor-paginated list (``{"data", "has_more", "next_cursor"}``), page after page,
        at most ``max_items``."""
        after, served = None, 0
        size = max(1, min(page_size, MAX_PAGE_SIZE, max_items or MAX_PAGE_SIZE))
        while True:
            page = yield from self._call("GET", path, dict, params={**(params or {}), "limit": size, "after": after})
            for item in page.get("data") or []:
                if max_items is not None and served >= max_items:
                    return
                served += 1
                yield Emit(parse(item))
            after = page.get("next_cursor")
            if not page.get("has_more") or not after:
                return

    def _items(self, path: str, parse: Callable[[dict], T], **request: Any) -> Flow[list[T]]:
        """A ``{"data": [...]}`` answer as a list of objects."""
        body = yield from self._call("GET", path, dict, **request)
        return [parse(item) for item in body.get("data") or []]
