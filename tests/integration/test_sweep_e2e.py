"""kill -9 of the API mid-upload, then a restart: its sweeper removes what the dead process left behind.

Two uploads are in flight when the API dies: one still streaming its body (a slow generator), one whose
body has arrived and that is being copied to its temp file and inspected. A complete orphan blob and a
``.partial`` are planted beside them. Ages are set in the past with os.utime; nothing sleeps a fixed time.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.fixtures import PARKED_QUEUE, start_process, stop_process
from tests.support.flow import wait_http
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
BOUNDARY = "sweep-e2e-boundary"
PAST = 2 * 3600  # seconds: older than every age setting, the inspection-timeout floor included


def _serve(data_dir: Path, log: Path, **env: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_process([sys.executable, "-m", "app.cli", "serve"], log, env={
        "DISTILLERY_PORT": str(port), "DISTILLERY_DATA_DIR": str(data_dir), "DISTILLERY_JOB_QUEUE": PARKED_QUEUE,
        **env})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


def _multipart(body: Iterator[bytes]) -> Iterator[bytes]:
    yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n--{BOUNDARY}\r\n'
           f'Content-Disposition: form-data; name="file"; filename="big.onnx"\r\n'
           f"Content-Type: application/octet-stream\r\n\r\n").encode()
    yield from body
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def _upload_in_background(url: str, headers: dict, body: Iterator[bytes]) -> threading.Thread:
    def post() -> None:
        try:
            httpx.post(f"{url}/v1/models", content=_multipart(body), timeout=120,
                       headers={**headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        except httpx.HTTPError:
            pass  # the server dies under it: that is the point

    t = threading.Thread(target=post, daemon=True)
    t.start()
    return t


def _junk_onnx(total: int, stop: threading.Event, pause: float = 0.0) -> Iterator[bytes]:
    """``total`` bytes that look like ONNX for their first byte (so the upload is inspected, not refused at once)."""
    chunk = b"\x08" + secrets.token_bytes(MiB - 1)
    for _ in range(total // MiB):
        if stop.is_set():
            return
        yield chunk
        if pause:
            time.sleep(pause)


def _leftovers(data: Path, planted: list[Path]) -> list[Path]:
    tmp = data / "tmp"
    temp = [p for p in tmp.iterdir() if p.name.startswith(("upload-", "inspect-"))] if tmp.exists() else []
    partial = list((data / "blobs").rglob("*.partial"))
    return temp + partial + [p for p in planted if p.exists()]


def _age_tree(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (t, t), follow_symlinks=False)


def test_restart_after_kill_9_mid_upload_sweeps_temp_partial_and_orphans(backend, make_key, teacher_files,
                                                                         digits_npz, tmp_path):
    data = tmp_path / "data"
    headers = make_key("sweep-e2e")
    proc, url = _serve(data, tmp_path / "api-1.log")
    stop_streaming = threading.Event()
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            model = c.post("/v1/models", files={"file": ("t.onnx", teacher_files["onnx"].read_bytes())},
                           data={"name": "teacher"})
            dataset = c.post("/v1/datasets", files={"file": ("d.npz", digits_npz)},
                             data={"name": "digits", "format": "npz"})
        assert model.status_code == 201 and dataset.status_code == 201, (model.text, dataset.text)
        referenced = [data / "blobs" / "models" / model.json()["id"], data / "blobs" / "datasets" / dataset.json()["id"]]
        assert all(p.is_file() for p in referenced)

        # One upload still streaming (1 GiB at a trickle), one whose 96 MiB have all arrived.
        slow = _upload_in_background(url, headers, _junk_onnx(1024 * MiB, stop_streaming, pause=0.05))
        fast = _upload_in_background(url, headers, _junk_onnx(96 * MiB, stop_streaming))
        tmp = data / "tmp"
        wait_until(lambda: tmp.exists() and any(p.name.startswith("upload-") for p in tmp.iterdir()), 60,
                   "the complete upload's temp file to appear")
        os.killpg(proc.pid, signal.SIGKILL)  # mid-request: no finally, no lifespan shutdown
        proc.wait()
    finally:
        stop_streaming.set()
        stop_process(proc)
    slow.join(30)
    fast.join(30)

    leaked = [p for p in tmp.iterdir() if p.name.startswith("upload-")]
    assert leaked, "the kill left no temp upload behind; nothing for the sweep to prove"
    # A blob whose row never committed, and a copy into storage cut off half-way.
    orphan = data / "blobs" / "models" / "mdl_000000000000orphan"
    orphan.write_bytes(b"\x08" + secrets.token_bytes(4 * MiB))
    partial = data / "blobs" / "datasets" / "ds_000000000000cutoff.partial"
    partial.write_bytes(secrets.token_bytes(3 * MiB))
    for p in [*tmp.iterdir(), orphan, partial, *referenced]:  # the referenced blobs are old too: only rows keep them
        _age_tree(p, PAST)
    assert _leftovers(data, [orphan])

    log = tmp_path / "api-2.log"
    proc, url = _serve(data, log, DISTILLERY_SWEEP_TEMP_AGE_SECONDS="1", DISTILLERY_SWEEP_ORPHAN_AGE_SECONDS="1",
                       DISTILLERY_SWEEP_INTERVAL_SECONDS="0.5")
    try:
        wait_until(lambda: not _leftovers(data, [orphan]), 60, "the restarted API to sweep what was left")
        assert all(p.is_file() for p in referenced)
        with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
            assert c.get(f"/v1/models/{model.json()['id']}").status_code == 200
            assert c.get(f"/v1/datasets/{dataset.json()['id']}").status_code == 200
    finally:
        stop_process(proc)
    text = log.read_text(errors="replace")
    assert "sweep removed" in text and "Traceback" not in text, text[-3000:]
