"""Request counters for /metrics (app/api/prometheus.py), and the request guard — one small ASGI middleware.

The guard runs before any route: NUL bytes in the path or query are refused (422) before they can
reach a database that rejects them, and request bodies are counted *as they stream in* (chunked
bodies declare no Content-Length), so an oversized body is stopped with 413 once it passes its limit
instead of being spooled to disk or buffered in memory first.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.prometheus import IN_FLIGHT, REQUEST_SECONDS, REQUESTS
from app.errors import problem

# The routes that take multipart uploads; every other body is held to the JSON cap.
UPLOAD_PATHS = ("/v1/models", "/v1/datasets")


class BodyTooLarge(Exception):
    """Raised from ``receive`` once the body passes its limit, so whatever is reading it stops at once."""


def _body_limit(scope: Scope, headers: dict[bytes, bytes], upload_limit: int, json_limit: int,
                upload_paths: frozenset[str]) -> tuple[int, str]:
    """Only multipart bodies sent to an upload route may be large; any other body is JSON (or junk) and
    gets the JSON cap. Judged by path too: a multipart content type alone must not buy a JSON route the
    upload limit (it reads its body whole, in memory)."""
    multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
    if multipart and scope.get("path", "").rstrip("/") in upload_paths:
        return upload_limit, "DISTILLERY_MAX_UPLOAD_BYTES, plus 1 MiB for the multipart framing"
    return json_limit, "DISTILLERY_MAX_JSON_BODY_BYTES"


def _too_large(limit: int, setting: str, declared: int | None = None):
    size = f" ({declared} bytes)" if declared is not None else ""
    # Connection: close — the server stops reading the rest of the body rather than draining it.
    return problem(413, "Payload too large", f"the request body{size} exceeds the limit of {limit} bytes "
                   f"({setting})", "payload_too_large", headers={"Connection": "close"})


def _nul_refusal(scope: Scope):
    """422 for a NUL byte in the path or the query string (``%00``): no column or file name may hold one."""
    where = "path" if "\x00" in scope.get("path", "") else None
    query = scope.get("query_string") or b""
    if where is None and (b"%00" in query or b"\x00" in query):
        where = "query"
    if where is None:
        return None
    return problem(422, "Validation failed", f"the {where} contains a NUL byte (%00), which is never valid here",
                   "validation_error", errors=[{"loc": [where], "msg": "NUL bytes are not allowed"}])


class Telemetry:
    """Counts requests by route template; refuses NUL bytes in the URL and bodies over their limit."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_json_bytes: int | None = None,
                 upload_paths: tuple[str, ...] = UPLOAD_PATHS):
        self.app, self.max_body = app, max_body_bytes
        self.max_json = max_json_bytes if max_json_bytes is not None else max_body_bytes
        self.upload_paths = frozenset(upload_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"status": 500, "started": False, "refused": False}
        began = time.perf_counter()
        IN_FLIGHT.inc()

        async def _send(message: Message) -> None:
            if state["refused"]:
                return  # our 413 already went out; drop whatever the app answers after it
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        try:
            await self._guarded(scope, receive, _send, state)
        finally:
            IN_FLIGHT.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], route, str(state["status"])).inc()
            REQUEST_SECONDS.labels(scope["method"], route).observe(time.perf_counter() - began)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, state: dict) -> None:
        """``send`` is the counting one, which drops the app's answer once our 413 is out."""
        refusal = _nul_refusal(scope)
        headers = dict(scope.get("headers") or [])
        limit, setting = _body_limit(scope, headers, self.max_body, self.max_json, self.upload_paths)
        declared = headers.get(b"content-length")
        if refusal is None and declared and declared.isdigit() and int(declared) > limit:
            refusal = _too_large(limit, setting, int(declared))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        seen = 0

        async def _receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    if not state["started"]:
                        await _too_large(limit, setting)(scope, receive, send)
                        state["refused"] = True
                    raise BodyTooLarge(f"request body passed {limit} bytes")
            return message

        try:
            await self.app(scope, _receive, send)
        except Exception:
            # Once the 413 is out, any error is the reader giving up on the stopped body. Before that
            # (the response had started), re-raise: the server drops the connection.
            if not state["refused"]:
                raise
