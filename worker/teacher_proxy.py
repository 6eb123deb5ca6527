"""The sandboxed executor's one way out: a Unix-socket proxy to the job's allow-listed served teacher.

A job whose spec names ``teacher.endpoint`` runs, like every job, in an executor without network. The supervisor
starts a :class:`TeacherProxy` on ``endpoint.sock`` in the job's scratch directory (bound into the sandbox) and
writes ``endpoint.json`` (``{"model", "top_logprobs", "socket"}``) as the job's teacher input. The proxy:

* accepts ``POST /v1/completions`` only, with a JSON body of at most 16 MiB; the ``model`` is forced to the spec's;
* forwards it to ``<url>/completions`` only when the URL's host is on ``DISTILLERY_TEACHER_ENDPOINT_HOSTS`` (checked
  again here: the spec was checked by the API, but the deployment may have changed since), without redirects,
  adding ``Authorization: Bearer <DISTILLERY_TEACHER_ENDPOINT_API_KEY>``;
* relays the answer (at most 256 MiB), or a 502 naming what failed.

So the endpoint's address and credentials never enter the sandbox, and a hostile job can reach nothing else.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import socketserver
import threading
from pathlib import Path
from typing import Any

import httpx

from app.settings import Settings

log = logging.getLogger("distillery.worker")

SOCKET_NAME = "endpoint.sock"
CONFIG_NAME = "endpoint.json"
MAX_REQUEST_BYTES = 16 << 20
MAX_RESPONSE_BYTES = 256 << 20


class EndpointRefused(Exception):
    """The served teacher may not be used (its host left the allow-list)."""


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, url: str, model: str, settings: Settings):
        self.url, self.model, self.settings = url.rstrip("/"), model, settings
        self.client = httpx.Client(timeout=settings.teacher_endpoint_timeout_seconds, follow_redirects=False)
        super().__init__(path, _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # Unix sockets have no client address
        log.debug("teacher proxy: " + format, *args)

    def address_string(self) -> str:
        return "executor"

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._answer(status, json.dumps({"error": {"message": message}}).encode())

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._error(405, "only POST /v1/completions is forwarded")

    def do_POST(self) -> None:  # noqa: N802
        srv = self.server
        if self.path != "/v1/completions":
            return self._error(404, "only POST /v1/completions is forwarded")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_REQUEST_BYTES:
            return self._error(413, f"a request body of 1 byte to {MAX_REQUEST_BYTES} bytes is forwarded")
        try:
            body = json.loads(self.rfile.read(length))
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return self._error(400, "the body must be a JSON object")
        if not srv.settings.teacher_endpoint_allowed(srv.url):
            return self._error(403, "the served teacher's host is no longer on the deployment's allow-list")
        headers = {"Content-Type": "application/json"}
        if srv.settings.teacher_endpoint_api_key:
            headers["Authorization"] = f"Bearer {srv.settings.teacher_endpoint_api_key}"
        try:
            with srv.client.stream("POST", srv.url + "/completions", json={**body, "model": srv.model},
                                   headers=headers) as resp:
                data = b""
                for chunk in resp.iter_bytes():
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        return self._error(502, "the served teacher's answer is larger than 256 MiB")
                status = resp.status_code
        except httpx.HTTPError as exc:
            return self._error(502, f"the served teacher cannot be reached: {type(exc).__name__}: {exc}"[:500])
        self._answer(status if status < 300 else 502 if status >= 500 else status, data)


class TeacherProxy:
    """Serve :data:`SOCKET_NAME` in ``scratch`` for the job's ``endpoint`` spec; :meth:`close` when the job ends."""

    def __init__(self, scratch: Path, endpoint: dict[str, Any], settings: Settings):
        url = str(endpoint["url"])
        if not settings.teacher_endpoint_allowed(url):
            raise EndpointRefused(f"the served teacher's host ({url}) is not on this deployment's allow-list "
                                  "(DISTILLERY_TEACHER_ENDPOINT_HOSTS)")
        # AF_UNIX paths are limited to 107 bytes; /proc/self/fd/<dir> keeps the bound path short whatever the
        # scratch directory's length.
        self._dir_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
        self.path = scratch / SOCKET_NAME
        self.server = _Server(f"/proc/self/fd/{self._dir_fd}/{SOCKET_NAME}", url, str(endpoint["model"]), settings)
        self.thread = threading.Thread(target=self.server.serve_forever, name="distillery-teacher-proxy", daemon=True)
        self.thread.start()
        (scratch / CONFIG_NAME).write_text(json.dumps({"model": endpoint["model"],
                                                       "top_logprobs": int(endpoint.get("top_logprobs", 20)),
                                                       "socket": SOCKET_NAME}))

    @property
    def config_path(self) -> Path:
        return self.path.parent / CONFIG_NAME

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.server.client.close()
        os.close(self._dir_fd)
        self.path.unlink(missing_ok=True)
