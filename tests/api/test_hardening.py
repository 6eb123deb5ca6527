"""Request hardening, in process: what a hostile tenant may send is a 4xx problem, never a 500.

Deep or huge JSON, NUL bytes and over-long values in every place a client controls, the /metrics
token, and the Idempotency-Key claim (replay, reuse, a concurrent winner still in flight).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import threading
import time

import pytest
from sqlalchemy import func, select, text

from app import idempotency
from app.db.models import IdempotencyRecord, Job, Model
from app.db.session import get_sessionmaker
from app.settings import get_settings
from tests.support.jobs import job_body

DEPTH = get_settings().max_json_depth


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def assert_problem(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["status"] == status and body["detail"], body
    if code is not None:
        assert body["code"] == code, body
    return body


# ---- JSON: depth, numbers, strings -----------------------------------------------------------


def test_json_depth_limit_on_every_json_endpoint(client, make_key, teacher_files):
    h = {**make_key("harden-depth"), "Content-Type": "application/json"}
    too_deep = '{"metadata": {"x": ' + nested(DEPTH + 1) + "}}"
    assert_problem(client.post("/v1/jobs", headers=h, content=too_deep), 422, "invalid_json")
    # A million brackets: refused by the linear scan long before json.loads could recurse.
    assert_problem(client.post("/v1/jobs", headers=h, content=nested(400_000)), 422, "invalid_json")
    uri_body = '{"name": "d", "uri": "file:///x.npz", "options": ' + nested(DEPTH + 1) + "}"
    assert_problem(client.post("/v1/datasets", headers=h, content=uri_body), 422, "invalid_json")
    # JSON inside form fields: the model's architecture, the dataset's options and inputs.
    hk = make_key("harden-depth")
    arch = '{"family": "mlp", "x": ' + nested(DEPTH + 1) + "}"
    r = client.post("/v1/models", headers=hk, files={"file": ("t.pt", teacher_files["torchscript"].read_bytes())},
                    data={"name": "t", "architecture": arch})
    assert_problem(r, 422, "invalid_architecture")
    for field, value in (("options", '{"a": ' + nested(DEPTH + 1) + "}"), ("inputs", nested(DEPTH + 1))):
        r = client.post("/v1/datasets", headers=hk, files={"file": ("d.npz", b"PK\x03\x04")},
                        data={"name": "d", "format": "npz", field: value})
        assert_problem(r, 422, "validation_error")
    # Exactly at the limit is still parsed (and then judged on its content).
    at_limit = '{"metadata": ' + "{\"a\": " * (DEPTH - 1) + "1" + "}" * (DEPTH - 1) + "}"
    r = client.post("/v1/jobs", headers=h, content=at_limit)
    assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text


def test_json_depth_scan_is_linear_on_pathological_input():
    from app.api.uploads import json_depth

    cases = ['"' + "\\\\" * 300_000,            # an unterminated string of escapes
             '"\\"' * 300_000,                   # quote, escaped quote, repeated
             "[" * 500_000 + '"' + "]" * 500_000,  # brackets hidden behind an unterminated string
             '["' * 300_000]
    for case in cases:
        start = time.perf_counter()
        json_depth(case)
        assert time.perf_counter() - start < 2.0, case[:20]
    assert json_depth('{"a": "[[[[", "b": [[1]]}') == 3
    assert json_depth('["\\"[[[", [2]]') == 2


@pytest.mark.parametrize("raw, why", [
    ('{"seed": ' + "9" * 5000 + "}", "5000 digits: int() refuses it"),
    ('{"seed": 99999999999999999999999}', "beyond 64 bits"),
    ('{"metadata": {"x": 1e999}}', "infinite float"),
    ('{"metadata": {"x": NaN}}', "NaN"),
    ('{"metadata": {"x": -Infinity}}', "-Infinity"),
    ('{"metadata": {"x": "\\u0000"}}', "escaped NUL in a value"),
    ('{"metadata": {"\\u0000": 1}}', "escaped NUL in a key"),
    ('{"metadata": {"x": "\\ud800"}}', "lone surrogate"),
    ('{"metadata": {"x": "' + "a" * 5000 + '"}}', "over-long string"),
    ('{"teacher_model_id": "mdl_\\u0000"}', "NUL in an id that reaches SQL"),
    ("\xff\xfe{}", "not UTF-8"),
    ("[]", "not an object"),
    ("", "empty"),
])
def test_hostile_json_bodies_are_422(client, make_key, raw, why):
    h = {**make_key("harden-json"), "Content-Type": "application/json"}
    body = raw.encode("latin-1") if raw.startswith("\xff") else raw.encode()
    r = client.post("/v1/jobs", headers=h, content=body)
    assert_problem(r, 422)
    assert r.json()["code"] in ("invalid_json", "validation_error"), (why, r.text)


def test_json_body_over_the_cap_is_413(client, make_key):
    h = make_key("harden-cap")
    big = json.dumps({"metadata": {"x": "a" * (get_settings().max_json_body_bytes + 1)}})
    r = client.post("/v1/jobs", headers={**h, "Content-Type": "application/json"}, content=big)
    assert_problem(r, 413, "payload_too_large")
    assert r.headers["connection"] == "close"
    # A multipart content type does not buy a JSON route the upload limit.
    r = client.post("/v1/jobs", headers={**h, "Content-Type": "multipart/form-data; boundary=x"}, content=big)
    assert_problem(r, 413, "payload_too_large")


class _Body:
    """An ASGI receive() handing out ``total`` bytes in chunks, counting how many were pulled."""

    def __init__(self, chunk: bytes, total: int):
        self.chunk, self.left, self.pulled = chunk, total, 0

    async def __call__(self):
        if self.left <= 0:
            return {"type": "http.disconnect"}
        self.left -= len(self.chunk)
        self.pulled += len(self.chunk)
        return {"type": "http.request", "body": self.chunk, "more_body": self.left > 0}


def _asgi_post(path: str, headers: dict[str, str], body: _Body) -> list[dict]:
    from app.main import app

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80), "state": {}}
    asyncio.run(app(scope, body, send))
    return sent


@pytest.mark.parametrize("path, ctype, limit", [
    ("/v1/jobs", "application/json", get_settings().max_json_body_bytes),
    ("/v1/jobs", "multipart/form-data; boundary=x", get_settings().max_json_body_bytes),
    ("/v1/datasets", "application/json", get_settings().max_json_body_bytes),
])
def test_chunked_body_is_stopped_as_it_streams(client, make_key, caplog, path, ctype, limit):
    """No Content-Length: the guard counts the body as it arrives, answers 413 once, stops reading."""
    chunk = b"[" * 65536
    body = _Body(chunk, 64 * limit)
    with caplog.at_level(logging.ERROR):
        sent = _asgi_post(path, {**make_key("harden-chunked"), "Content-Type": ctype,
                                 "Transfer-Encoding": "chunked"}, body)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [413], sent  # one response, never a second one after it
    assert (b"connection", b"close") in starts[0]["headers"]
    payload = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert payload["code"] == "payload_too_large"
    assert body.pulled <= limit + len(chunk), body.pulled
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize("path", ["/v1/models", "/v1/datasets"])
def test_upload_without_a_key_is_401_before_the_body_is_read(client, path):
    body = _Body(b"\0" * 65536, 64 * 65536)
    sent = _asgi_post(path, {"Content-Type": "multipart/form-data; boundary=x", "Transfer-Encoding": "chunked"},
                      body)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [401]
    assert body.pulled == 0


# ---- NUL bytes and over-long values in fields, queries, headers, URIs -------------------------


def test_nul_and_overlong_queries_paths_and_headers(client, make_key):
    h = make_key("harden-query")
    cursor_with_nul = base64.urlsafe_b64encode(json.dumps(["2024-01-01T00:00:00+00:00", "job_\x00"]).encode())
    refused = [
        "/v1/jobs?status=queued%00", "/v1/jobs?kind=%00", "/v1/models?after=%00", "/v1/jobs/job_%00",
        "/v1/models/mdl_x%00y", "/v1/datasets?after=" + "A" * 500, "/v1/jobs?kind=" + "k" * 300,
        "/v1/jobs?status=" + "s" * 100, "/v1/jobs?after=not-a-cursor",
        "/v1/jobs?after=" + cursor_with_nul.decode().rstrip("="),
        "/v1/jobs/job_x/events?after=" + "9" * 5000, "/v1/jobs/job_x/events?after=" + str(2**64),
        "/v1/jobs?limit=" + "9" * 5000,
    ]
    for url in refused:
        r = client.get(url, headers=h)
        assert r.status_code == 422, (url[:80], r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    # Long path ids are just unknown ids.
    assert client.get("/v1/models/" + "m" * 5000, headers=h).status_code == 404
    for bad_key in ("k\x00ey", "k\x01", "k" * 201):
        r = client.post("/v1/jobs", headers={**h, "Idempotency-Key": bad_key}, json={})
        assert_problem(r, 422)


@pytest.mark.parametrize("field, value", [
    ("name", "te\x00acher"), ("name", "n" * 201), ("format", "onnx\x00"), ("task", "t" * 300),
    ("architecture", '{"family": "mlp\\u0000"}'), ("architecture", '{"family": "' + "a" * 70000 + '"}'),
])
def test_model_form_fields_nul_and_length(client, make_key, teacher_files, field, value):
    data = {"name": "teacher", field: value}
    r = client.post("/v1/models", headers=make_key("harden-form"), data=data,
                    files={"file": ("t.pt", teacher_files["torchscript"].read_bytes())})
    assert_problem(r, 422)


@pytest.mark.parametrize("field, value", [
    ("name", "d\x00"), ("name", "d" * 201), ("format", "npz\x00"), ("label_column", "y\x00"),
    ("label_column", "c" * 300), ("inputs", "x,\x00y"), ("options", '{"grayscale": "\\u0000"}'),
])
def test_dataset_form_fields_nul_and_length(client, make_key, digits_npz, field, value):
    r = client.post("/v1/datasets", headers=make_key("harden-form"), files={"file": ("d.npz", digits_npz)},
                    data={"name": "digits", "format": "npz", field: value})
    assert_problem(r, 422)


@pytest.mark.parametrize("uri, code", [
    ("file:///tmp/digits%00.npz", "invalid_uri"),
    ("file:///tmp/%00/../etc/passwd", "invalid_uri"),
    ("file://[/x", "invalid_uri"),
    ("file:///" + "a" * 3000, "validation_error"),
    ("file:///etc/" + "a/" * 600, "uri_not_allowed"),
    ("file://{root}/" + "x" * 300, "uri_not_found"),  # a name longer than the file system allows
    ("file://{root}/%00", "invalid_uri"),
])
def test_dataset_uri_nul_and_malformed(client, make_key, tmp_path, monkeypatch, uri, code):
    monkeypatch.setattr(get_settings(), "allowed_file_roots", [tmp_path])
    r = client.post("/v1/datasets", headers=make_key("harden-uri"),
                    json={"name": "d", "uri": uri.replace("{root}", str(tmp_path))})
    assert_problem(r, 422, code)


# ---- /metrics ---------------------------------------------------------------------------------


def test_metrics_token(client, make_key, monkeypatch):
    h = make_key("harden-metrics")
    client.get("/v1/jobs/job_0123456789abcdef", headers=h)  # a 404 with an id in its URL is counted too
    monkeypatch.setattr(get_settings(), "metrics_token", "scrape-s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic scrape-s3cret"},
                    {"Authorization": "Bearer scrape-s3cret-and-more"}, h):
        r = client.get("/metrics", headers=headers)
        assert_problem(r, 401, "unauthorized")
        assert "distillery_" not in r.text
    r = client.get("/metrics", headers={"Authorization": "Bearer scrape-s3cret"})
    assert r.status_code == 200 and "distillery_jobs" in r.text
    assert "job_0123" not in r.text and "harden-metrics" not in r.text
    # No id of any kind (prefix + hex), wherever it would sit: "seconds_bucket" is a series name, not an id.
    assert not re.search(r"\b(ten|mdl|ds|key|job|art)_[0-9a-f]{6}", r.text), re.findall(r"\w+_[0-9a-f]{6}\w*", r.text)
    assert 'route="/v1/jobs/{job_id}"' in r.text
    monkeypatch.setattr(get_settings(), "metrics_token", None)
    assert client.get("/metrics").status_code == 200


# ---- Idempotency-Key: replay, reuse, in flight --------------------------------------------------


def _jobs_with_key(key: str) -> int:
    with get_sessionmaker()() as s:
        rid = s.scalar(select(IdempotencyRecord.resource_id).where(IdempotencyRecord.key == key,
                                                                   IdempotencyRecord.endpoint == "jobs"))
        return s.scalar(select(func.count()).select_from(Job).where(Job.id == rid)) if rid else 0


def _hold_claim(headers: dict, endpoint: str, key: str, req_hash: str, resource_id: str):
    """A session that has claimed ``key`` and not committed: a concurrent winner still in flight."""
    s = get_sessionmaker()()
    s.add(IdempotencyRecord(tenant_id=_tenant_of(headers), endpoint=endpoint, key=key, request_hash=req_hash,
                            resource_id=resource_id))
    s.flush()
    return s


def _tenant_of(headers: dict) -> str:
    from app.auth import authenticate

    with get_sessionmaker()() as s:
        return authenticate(s, headers["Authorization"]).tenant_id


def _wait_for_lock_waiters(n: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    with get_sessionmaker()() as s:
        while time.monotonic() < deadline:
            waiting = s.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND wait_event_type = 'Lock'"))
            s.rollback()
            if waiting >= n:
                return
            time.sleep(0.05)
    raise AssertionError(f"fewer than {n} requests waiting on the claim after {timeout}s")


def test_job_replay_reuse_and_claim_order(client, make_key, uploaded):
    h = make_key("harden-idem")
    m, d = uploaded(h)
    key = {**h, "Idempotency-Key": "harden-1"}
    first = client.post("/v1/jobs", headers=key, json=job_body(m, d))
    again = client.post("/v1/jobs", headers=key, json=job_body(m, d))
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert_problem(client.post("/v1/jobs", headers=key, json=job_body(m, d, seed=9)), 409, "idempotency_key_reused")
    # A request refused by validation claims nothing: the key stays free for a valid one.
    bad = {**h, "Idempotency-Key": "harden-2"}
    assert client.post("/v1/jobs", headers=bad, json=job_body(m, d, steps=[])).status_code == 422
    assert client.post("/v1/jobs", headers=bad, json=job_body(m, d)).status_code == 202
    assert _jobs_with_key("harden-1") == _jobs_with_key("harden-2") == 1


@pytest.mark.postgres  # a row lock with a lock_timeout (SQLite locks the whole file)
def test_claim_in_flight_past_the_lock_timeout_is_409_with_retry_after(client, make_key, uploaded, monkeypatch):
    h = make_key("harden-inflight")
    m, d = uploaded(h)
    body = job_body(m, d)
    monkeypatch.setattr(idempotency, "IN_FLIGHT_WAIT_SECONDS", 1)
    holder = _hold_claim(h, "jobs", "harden-inflight", idempotency.request_hash(body), "job_inflight")
    results: list = []
    # In a thread, so that a claim that waited without bound fails this test instead of hanging it.
    waiter = threading.Thread(target=lambda: results.append(
        client.post("/v1/jobs", headers={**h, "Idempotency-Key": "harden-inflight"}, json=body)))
    try:
        waiter.start()
        waiter.join(15)
        assert results, "the claim waited past its lock timeout"
    finally:
        holder.rollback()  # the winner failed: its claim is gone
        holder.close()
        waiter.join(30)
    assert_problem(results[0], 409, "idempotency_in_flight")
    assert results[0].headers["retry-after"] == "1"
    r = client.post("/v1/jobs", headers={**h, "Idempotency-Key": "harden-inflight"}, json=body)
    assert r.status_code == 202 and "Idempotent-Replayed" not in r.headers, r.text


@pytest.mark.postgres  # waiters on a row lock, counted in pg_stat_activity
def test_losers_waiting_on_a_claim_replay_the_winner(client, make_key, uploaded):
    """Two requests find the key claimed by an uncommitted winner; once it commits, the identical one
    replays the winner's job and the one with another body gets idempotency_key_reused."""
    h = make_key("harden-race")
    m, d = uploaded(h)
    winner = client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()["id"]
    body = job_body(m, d)
    holder = _hold_claim(h, "jobs", "harden-race", idempotency.request_hash(body), winner)
    results: dict[str, object] = {}

    def post(name: str, payload: dict) -> None:
        results[name] = client.post("/v1/jobs", headers={**h, "Idempotency-Key": "harden-race"}, json=payload)

    threads = [threading.Thread(target=post, args=("same", body)),
               threading.Thread(target=post, args=("other", job_body(m, d, seed=3)))]
    try:
        for t in threads:
            t.start()
        _wait_for_lock_waiters(2)
        holder.commit()
    finally:
        holder.close()
        for t in threads:
            t.join(30)
    same, other = results["same"], results["other"]
    assert same.status_code == 202 and same.json()["id"] == winner, same.text
    assert same.headers["Idempotent-Replayed"] == "true"
    assert_problem(other, 409, "idempotency_key_reused")
    assert _jobs_with_key("harden-race") == 1


def _blob_files() -> set[str]:
    root = get_settings().blob_dir
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_model_replay_stores_one_blob(client, make_key, teacher_files):
    h = {**make_key("harden-model-idem"), "Idempotency-Key": "harden-model"}
    content = teacher_files["onnx"].read_bytes()
    before = _blob_files()
    post = lambda name: client.post("/v1/models", headers=h, files={"file": ("t.onnx", content)},  # noqa: E731
                                    data={"name": name})
    first, again = post("teacher"), post("teacher")
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert_problem(post("other-name"), 409, "idempotency_key_reused")
    assert _blob_files() - before == {f"models/{first.json()['id']}"}


def test_a_blob_whose_row_never_commits_is_deleted(client, make_key, teacher_files, monkeypatch):
    from sqlalchemy.orm import Session

    h = make_key("harden-orphan")
    before = _blob_files()

    def failing_commit(self):
        raise RuntimeError("the database went away at commit")

    monkeypatch.setattr(Session, "commit", failing_commit)
    with pytest.raises(RuntimeError, match="went away"):
        client.post("/v1/models", headers=h, files={"file": ("t.onnx", teacher_files["onnx"].read_bytes())},
                    data={"name": "orphan"})
    monkeypatch.undo()
    assert _blob_files() == before
    with get_sessionmaker()() as s:
        assert s.scalar(select(func.count()).select_from(Model).where(Model.name == "orphan")) == 0
