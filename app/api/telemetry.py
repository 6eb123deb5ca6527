"""In-process request counters for /metrics, and the upload size guard — one small ASGI middleware."""

from __future__ import annotations

from collections import Counter

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import problem

REQUESTS: Counter[tuple[str, str, str]] = Counter()


class Telemetry:
    """Counts requests by route template and refuses bodies over the upload limit before reading them."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            resp = problem(413, "Payload too large", f"the request body ({int(declared)} bytes) exceeds the upload "
                           f"limit of {self.max_body} bytes (DISTILLERY_MAX_UPLOAD_BYTES)", "payload_too_large")
            await resp(scope, receive, send)
            return
        status_holder = {"status": 500}

        async def _send(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            REQUESTS[(scope["method"], getattr(route, "path", "unmatched"), str(status_holder["status"]))] += 1
