"""Serving the console's files with strict security headers (no inline script, no framing, no referrer).

:func:`mount` adds one Starlette mount at ``/console`` to the API app: ``GET /console`` redirects to
``/console/``, which answers ``index.html``; the modules and CSS beside it are plain files. Nothing under the
mount takes credentials or touches the database.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().parent / "static"
PATH = "/console"

#: Every console response carries these. The CSP allows scripts, styles, fetches and images from this origin
#: only (blob:/data: images: PNG plots fetched with the bearer header are shown through blob URLs); inline
#: script and style are refused, so a string that slipped into markup could never run.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidate every load (ETag / Last-Modified make that a 304): an upgraded server never runs stale modules.
    "Cache-Control": "no-cache",
}


class SecurityHeaders:
    """ASGI wrapper that sets :data:`SECURITY_HEADERS` on every response of the wrapped app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_secured)


def mount(app: FastAPI) -> None:
    """Serve :data:`STATIC_DIR` at ``/console`` (``index.html`` for the directory itself)."""
    app.mount(PATH, SecurityHeaders(StaticFiles(directory=STATIC_DIR, html=True)), name="console")
