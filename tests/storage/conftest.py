"""Fixtures of the storage tests: a real S3 endpoint (moto's standalone server, speaking S3 over HTTP on a free
port), fresh buckets, settings pointed at them, and a small HTTP file server with redirects."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

#: Dummy credentials: moto accepts any; they keep boto3 from looking for real ones.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    url: str

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, config=Config(s3={"addressing_style": "path"}))

    def bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def settings(self, storage_url: str | None, **changes):
        """This process's settings with the storage (and S3 endpoint) set, as a copy."""
        from app.settings import get_settings

        return get_settings().model_copy(update={"storage_url": storage_url, "s3_endpoint_url": self.url,
                                                 "s3_addressing_style": "path", **changes})


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_settings(s3_server, monkeypatch):
    """``s3_settings(storage_url=None, **changes)``: point this process's settings at the test S3 endpoint
    (and, with ``storage_url``, store blobs there); undone after the test."""
    from app.settings import get_settings

    def use(storage_url: str | None = None, **changes):
        settings = get_settings()
        for k, v in {"storage_url": storage_url, "s3_endpoint_url": s3_server.url, "s3_addressing_style": "path",
                     **changes}.items():
            monkeypatch.setattr(settings, k, v)
        return settings

    return use


@dataclass
class FileServer:
    """Serves ``files[path]`` with 200, ``redirects[path]`` with 302 to that location, anything else 404."""

    port: int
    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="session")
def file_server() -> Iterator[FileServer]:
    state = FileServer(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            state.hits.append(self.path)
            if self.path in state.redirects:
                self.send_response(302)
                self.send_header("Location", state.redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path in state.files:
                body = state.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", state.port), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
