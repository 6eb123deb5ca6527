"""Request hardening against a real uvicorn server on PostgreSQL, as a hostile tenant would try it.

The server here has its own data directory (so every byte it writes can be measured), a 10 MiB
upload limit, its spooled multipart files inside that directory (TMPDIR), and a job queue no worker
consumes (jobs stay queued, for the followers). Numbers are printed (``pytest -s -n0`` shows them).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, text

from app.db.models import Dataset, IdempotencyRecord, Job, Model
from app.db.session import get_sessionmaker
from tests.support.fixtures import PARKED_QUEUE, start_process, stop_process
from tests.support.flow import wait_http
from tests.support.jobs import job_body

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
UPLOAD_LIMIT = 10 * MiB


class Server:
    def __init__(self, url: str, data_dir: Path, proc, log: Path):
        self.url, self.data_dir, self.proc, self.log = url, data_dir, proc, log

    def bytes_on_disk(self) -> int:
        total = 0
        for p in self.data_dir.rglob("*"):
            try:
                total += p.stat().st_size if p.is_file() else 0
            except FileNotFoundError:  # a temp file removed while we walked
                pass
        return total

    def bytes_written(self) -> int:
        """Every byte the server process has passed to write() (files, sockets, its log): an upper bound
        on what it wrote to any file, unlinked spool files included."""
        for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
        raise AssertionError("no wchar in /proc/<pid>/io")

    def blob_keys(self) -> set[str]:
        root = self.data_dir / "blobs"
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


@pytest.fixture(scope="module")
def server(postgres_backend, tmp_path_factory) -> Server:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = tmp_path_factory.mktemp("hardened")
    data_dir, spool = base / "data", base / "data" / "spool"
    spool.mkdir(parents=True)
    log = base / "api.log"
    proc = start_process([sys.executable, "-m", "app.cli", "serve"], log, env={
        **postgres_backend.env, "DISTILLERY_PORT": str(port), "DISTILLERY_DATA_DIR": str(data_dir),
        "DISTILLERY_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT), "DISTILLERY_JOB_QUEUE": PARKED_QUEUE,
        "TMPDIR": str(spool)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url)
        yield Server(url, data_dir, proc, log)
    finally:
        stop_process(proc)
    text_log = log.read_text(errors="replace")
    assert "Traceback" not in text_log and "unhandled error" not in text_log, text_log[-4000:]


@pytest.fixture(scope="module")
def tenant(server, postgres_backend, teacher_files, digits_npz) -> dict:
    """A tenant with a teacher and a dataset on this server (plain uploads with a Content-Length)."""
    headers = postgres_backend.key("hardening-e2e")
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        m = c.post("/v1/models", files={"file": ("t.onnx", teacher_files["onnx"].read_bytes())},
                   data={"name": "teacher"})
        d = c.post("/v1/datasets", files={"file": ("d.npz", digits_npz)}, data={"name": "digits", "format": "npz"})
    assert m.status_code == 201 and d.status_code == 201, (m.text, d.text)
    return {"headers": headers, "model": m.json()["id"], "dataset": d.json()["id"]}


def _read_response(sock: socket.socket, out: dict) -> None:
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            if sep and length and len(body) >= length[0]:
                break
    except OSError as exc:
        out["error"] = exc
    out["raw"] = data


def test_chunked_200_mib_upload_is_413_with_little_written(server, tenant):
    """Transfer-Encoding: chunked, no Content-Length, 200 MiB against a 10 MiB limit."""
    boundary = "hardening-boundary"
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (f"POST /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: {tenant['headers']['Authorization']}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n")
    preamble = (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nhuge\r\n--{boundary}\r\n'
                f'Content-Disposition: form-data; name="file"; filename="huge.bin"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode()

    def chunk(b: bytes) -> bytes:
        return f"{len(b):x}\r\n".encode() + b + b"\r\n"

    response: dict = {}
    reader = threading.Thread(target=_read_response, args=(sock, response))
    peak = {"disk": 0}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak["disk"] = max(peak["disk"], server.bytes_on_disk())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    written_before, disk_before = server.bytes_written(), server.bytes_on_disk()
    sent = 0
    sampler.start()
    reader.start()
    try:
        sock.sendall(head.encode() + chunk(preamble))
        block = b"\0" * MiB
        for _ in range(200):
            sock.sendall(chunk(block))
            sent += MiB
        sock.sendall(chunk(f"\r\n--{boundary}--\r\n".encode()) + b"0\r\n\r\n")
    except OSError:  # the server answered 413 and closed: it stopped reading, as it should
        pass
    reader.join(30)
    sampling.set()
    sampler.join()
    sock.close()
    written = server.bytes_written() - written_before
    print(f"\nchunked 200 MiB upload: client got through {sent / MiB:.0f} MiB before the server stopped reading; "
          f"server wrote {written / MiB:.2f} MiB in all (wchar); data dir peak {peak['disk'] / MiB:.2f} MiB "
          f"above {disk_before / MiB:.2f} MiB before")
    raw = response.get("raw", b"")
    assert raw.startswith(b"HTTP/1.1 413 "), (response, raw[:500])
    assert raw.count(b"HTTP/1.1 ") == 1  # one response, nothing after it
    head_, _, body = raw.partition(b"\r\n\r\n")
    assert b"application/problem+json" in head_ and b"connection: close" in head_.lower()
    assert b'"code":"payload_too_large"' in body
    assert written < 20 * MiB, written
    assert peak["disk"] - disk_before < 20 * MiB, peak
    assert sent < 200 * MiB  # the rest was never read
    assert server.bytes_on_disk() <= disk_before + MiB  # and nothing of it stays behind
    assert server.proc.poll() is None


_sse_job: dict[str, str] = {}


def _count(stmt) -> int:
    with get_sessionmaker()() as s:
        return s.scalar(stmt)


def _concurrently(n: int, fn) -> list:
    barrier = threading.Barrier(n)

    def run(i: int):
        barrier.wait(30)
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_60_concurrent_job_posts_with_one_key(server, tenant):
    body = job_body(tenant["model"], tenant["dataset"])
    headers = {**tenant["headers"], "Idempotency-Key": "e2e-jobs-60"}
    with httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=80)) as c:
        responses = _concurrently(60, lambda _: c.post("/v1/jobs", headers=headers, json=body))
    statuses = sorted(r.status_code for r in responses)
    print(f"\n60 same-key job POSTs: {statuses.count(202)} × 202, "
          f"{sum(r.headers.get('idempotent-replayed') == 'true' for r in responses)} of them replays, "
          f"{statuses.count(409)} × 409 in flight")
    assert all(s < 500 for s in statuses), [r.text for r in responses if r.status_code >= 500][:3]
    accepted = [r for r in responses if r.status_code == 202]
    assert accepted and {r.json()["id"] for r in accepted} == {accepted[0].json()["id"]}
    for r in responses:
        if r.status_code == 409:
            assert r.json()["code"] == "idempotency_in_flight" and r.headers["retry-after"], r.text
        else:
            assert r.status_code == 202, r.text
    job_id = accepted[0].json()["id"]
    assert _count(select(func.count()).select_from(IdempotencyRecord)
                  .where(IdempotencyRecord.key == "e2e-jobs-60")) == 1
    assert _count(select(func.count()).select_from(Job).where(Job.id == job_id)) == 1
    # This tenant's jobs: only this one so far (the followers' job comes later in the module).
    tenant_id = _count(select(Model.tenant_id).where(Model.id == tenant["model"]))
    assert _count(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id,
                                                              Job.id != _sse_job.get("id", ""))) == 1


def test_30_concurrent_model_uploads_with_one_key_leave_no_orphan_blob(server, tenant, teacher_files):
    content = teacher_files["torchscript"].read_bytes()
    headers = {**tenant["headers"], "Idempotency-Key": "e2e-models-30"}
    with httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=40)) as c:
        responses = _concurrently(30, lambda _: c.post("/v1/models", headers=headers, data={"name": "same"},
                                                       files={"file": ("t.pt", content)}))
    statuses = sorted(r.status_code for r in responses)
    print(f"\n30 same-key model uploads: {statuses.count(201)} × 201 "
          f"({sum(r.headers.get('idempotent-replayed') == 'true' for r in responses)} replays), "
          f"{statuses.count(409)} × 409 in flight")
    assert all(s < 500 for s in statuses), [r.text for r in responses if r.status_code >= 500][:3]
    created = [r for r in responses if r.status_code == 201]
    assert created and {r.json()["id"] for r in created} == {created[0].json()["id"]}
    assert all(r.status_code == 201 or r.json()["code"] == "idempotency_in_flight" for r in responses)
    with get_sessionmaker()() as s:
        tenant_id = s.get(Model, tenant["model"]).tenant_id
        named = s.scalar(select(func.count()).select_from(Model).where(Model.tenant_id == tenant_id,
                                                                       Model.name == "same"))
        blobs = server.blob_keys()
        referenced = set(s.scalars(select(Model.storage_key).where(Model.storage_key.in_(blobs))))
        referenced |= set(s.scalars(select(Dataset.storage_key).where(Dataset.storage_key.in_(blobs))))
    assert named == 1
    assert blobs == referenced, blobs - referenced  # every blob is some row's; none is orphaned
    assert not [p for p in (server.data_dir / "tmp").glob("*")], "uploads left in tmp"


def test_25_sse_followers_hold_no_connection_and_starve_nothing(server, tenant):
    headers = tenant["headers"]
    with httpx.Client(base_url=server.url, headers=headers, timeout=30,
                      limits=httpx.Limits(max_connections=40)) as c:
        job_id = c.post("/v1/jobs", json=job_body(tenant["model"], tenant["dataset"], seed=25)).json()["id"]
        _sse_job["id"] = job_id
        following, errors = threading.Semaphore(0), []

        def follow() -> None:
            try:
                with c.stream("GET", f"/v1/jobs/{job_id}/events",
                              headers={"Accept": "text/event-stream"}, timeout=60) as r:
                    assert r.status_code == 200, r.status_code
                    announced = False
                    for line in r.iter_lines():
                        if line.startswith("event: ") and not announced:
                            following.release()
                            announced = True
                        if line == "event: cancel_requested":
                            return  # the job ended; the server closes the stream right after
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)
                following.release()

        followers = [threading.Thread(target=follow) for _ in range(25)]
        for t in followers:
            t.start()
        try:
            for _ in followers:
                assert following.acquire(timeout=30), "a follower got no event within 30 s"
            assert not errors, errors
            latencies, stuck = [], []
            deadline = time.monotonic() + 2.5
            with get_sessionmaker()() as s:
                while time.monotonic() < deadline:
                    start = time.perf_counter()
                    r = c.get(f"/v1/jobs/{job_id}")
                    latencies.append(time.perf_counter() - start)
                    assert r.status_code == 200 and r.json()["status"] == "queued", r.text
                    # Idle in transaction for over a second: a connection checked out and forgotten.
                    stuck += s.execute(text(
                        "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database() "
                        "AND state LIKE 'idle in transaction%' AND state_change < now() - interval '1 second' "
                        "AND pid <> pg_backend_pid()")).all()
                    s.rollback()
                    time.sleep(0.1)
            print(f"\n25 SSE followers: GET /v1/jobs/{{id}} max {max(latencies) * 1000:.0f} ms, "
                  f"median {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms over {len(latencies)} requests")
            assert max(latencies) < 2.0, latencies
            assert not stuck, stuck
        finally:
            c.post(f"/v1/jobs/{job_id}/cancel")
            for t in followers:
                t.join(30)
    assert not any(t.is_alive() for t in followers), "a follower's stream did not end with the job"
    assert not errors, errors


def test_stalled_uploads_hold_no_database_session(api_url, make_key):
    """More uploads than the API has database sessions (DISTILLERY_DB_POOL_SIZE, 20), each sending its headers
    and a few bytes and then nothing: a body still on its way holds no session, so other requests answer at
    once instead of waiting for admission and getting 503."""
    from urllib.parse import urlparse

    from app.settings import get_settings

    h = make_key("stalled-uploads")
    url = urlparse(api_url)
    stalled = []
    try:
        for _ in range(get_settings().db_pool_size + 5):
            s = socket.create_connection((url.hostname, url.port), timeout=10)
            s.sendall((f"POST /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: {h['Authorization']}\r\n"
                       "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n"
                       "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.pt\"\r\n\r\nPK").encode())
            stalled.append(s)
        with httpx.Client(base_url=api_url, headers=h, timeout=30) as c:
            c.get("/v1/models")  # the route's own session: admitted at once although every upload is waiting
            began = time.monotonic()
            answers = [c.get("/v1/models").status_code for _ in range(5)]
            took = time.monotonic() - began
    finally:
        for s in stalled:
            s.close()
    assert answers == [200] * 5
    assert took < 2.5, f"5 requests took {took:.1f} s beside {len(stalled)} stalled uploads"
