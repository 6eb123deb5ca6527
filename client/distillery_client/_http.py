"""One request with retries: the policy (when to retry, how long to wait) and the :func:`send` operation.

Retried: connection failures, 429, 5xx, and 409 ``idempotency_in_flight`` (the first attempt of the same
create is still running on the server; a retry gets its response). A request that may have reached the
server is repeated only when that is harmless (``HttpRequest.replayable``): reads, deletes, cancel, and
creates, because each create call carries one ``Idempotency-Key`` for all its attempts. 429 and a 503 with
``Retry-After`` mean the server did not act on it, so they are retried whatever the request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx

from distillery_client._flow import Close, Flow, HttpRequest, Sleep, Transmit
from distillery_client.errors import APIConnectionError, APITimeoutError, error_from_response, retry_after_seconds

_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` attempts after the first; waits grow as ``base_delay * 2**n`` (capped at ``max_delay``)
    with jitter (a random 50-100 % of it), or follow the server's ``Retry-After`` (capped at
    ``max_retry_after``)."""

    max_retries: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        return min(self.max_delay, self.base_delay * 2 ** retry) * random.uniform(0.5, 1.0)

    def delay(self, retry: int, retry_after: str | None) -> float:
        seconds = retry_after_seconds(retry_after)
        return self.backoff(retry) if seconds is None else min(seconds, self.max_retry_after)


def _retry_status(response: httpx.Response, request: HttpRequest) -> bool:
    status = response.status_code
    if status == 429 or (status == 503 and "retry-after" in response.headers):
        return True
    if status == 409 and request.replayable and "retry-after" in response.headers:
        return True  # idempotency_in_flight: the server answers with Retry-After only for that conflict
    return status >= 500 and request.replayable


def send(request: HttpRequest, policy: RetryPolicy) -> Flow[httpx.Response]:
    """The response to ``request`` (2xx/3xx), after retries; raises the typed error otherwise."""
    for retry in range(policy.max_retries + 1):
        last = retry == policy.max_retries
        try:
            response = yield Transmit(request)
        except httpx.TransportError as exc:
            if last or not (request.replayable or isinstance(exc, _NOT_SENT)):
                kind = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
                raise kind(f"{request.method} {request.path}: {type(exc).__name__}: {exc or 'no answer'}",
                           request=getattr(exc, "_request", None)) from exc
            yield Sleep(policy.backoff(retry))
            continue
        if not last and _retry_status(response, request):
            if request.stream:
                yield Close(response)
            yield Sleep(policy.delay(retry, response.headers.get("retry-after")))
            continue
        if response.is_error:
            raise error_from_response(response)
        return response
    raise AssertionError("unreachable")  # pragma: no cover - the last attempt returns or raises
