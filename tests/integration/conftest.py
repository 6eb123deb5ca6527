"""Integration fixtures: the API as its own process (uvicorn) beside the real worker."""

from __future__ import annotations

import sys

import httpx
import pytest

from tests.integration.chaos_stack import chaos_stack  # noqa: F401 - the chaos suite's fixture
from tests.support.fixtures import start_process, stop_process
from tests.support.flow import wait_http


@pytest.fixture(scope="session")
def api_url(postgres_backend, tmp_path_factory, celery_worker):
    """Base URL of a `distillery serve` process on a free port (PostgreSQL + Redis)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("api") / "api.log"
    proc = start_process([sys.executable, "-m", "app.cli", "serve"], log, env={**postgres_backend.env, "DISTILLERY_PORT": str(port)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url)
        yield url
    finally:
        stop_process(proc)


@pytest.fixture()
def http(api_url, make_key):
    with httpx.Client(base_url=api_url, headers=make_key("integration"), timeout=30) as c:
        yield c
