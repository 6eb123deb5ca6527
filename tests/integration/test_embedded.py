"""`distillery run` — the embedded default (SQLite, a SQLite-backed Celery queue, local files) — end to end."""

from __future__ import annotations

import os
import socket

import httpx
import pytest

from tests.support.embedded import embedded_service
from tests.support.fixtures import stop_process
from tests.support.flow import check_student_files, distill_digits


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    data = tmp_path_factory.mktemp("embedded")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing but the data dir and port: the defaults must give a working service.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(DISTILLERY_DATA_DIR=str(data), DISTILLERY_PORT=str(port), DISTILLERY_WORKER_THREADS="1")
    with embedded_service(env, data, port, "laptop") as service:
        yield service


@pytest.mark.slow  # trains a whole job to an accuracy floor
def test_embedded_flow_and_clean_shutdown(embedded, teacher_files, digits):
    assert "listening on http://127.0.0.1" in embedded["log"].read_text()
    assert (embedded["data"] / "distillery.db").exists() and (embedded["data"] / "queue.db").exists()
    with httpx.Client(base_url=embedded["url"], headers={"Authorization": f"Bearer {embedded['key']}"},
                      timeout=30) as http:
        assert http.get("/readyz").json()["status"] == "ready"
        job, files = distill_digits(http, teacher_files["onnx"], digits)
    check_student_files(files, digits, min_accuracy=0.90)
    assert job["metrics"]["student"]["accuracy"] >= 0.90
    # SIGTERM stops the API and the worker, cleanly.
    assert stop_process(embedded["proc"], timeout=30) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{embedded['url']}/healthz", timeout=2)
    log = embedded["log"].read_text()
    assert "Traceback" not in log, log[-3000:]
