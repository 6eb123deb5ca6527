"""Retries: which failures are retried, how long the SDK waits, and the one Idempotency-Key per create call."""

from __future__ import annotations

import httpx
import pytest

from distillery_client import APIConnectionError, RateLimitError, RetryPolicy, ServerError
from tests.client.mock_api import job, problem, replies, sdk

CREATED = httpx.Response(202, json=job())


def test_a_create_retried_after_5xx_and_a_dropped_connection_reuses_its_idempotency_key():
    client, rec = sdk(replies(problem(502, "bad_gateway", "upstream"), httpx.ReadError("reset"), CREATED))
    created = client.jobs.create({"teacher_model_id": "mdl_1"}, dataset_id="ds_1")
    assert created.id == "job_1"
    keys = [r.headers["idempotency-key"] for r in rec.requests]
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0]
    assert rec.requests[0].read() == b'{"teacher_model_id":"mdl_1","dataset_id":"ds_1"}'
    # A second create call is another request: a key of its own.
    client2, rec2 = sdk(replies(CREATED, CREATED))
    client2.jobs.create({"teacher_model_id": "mdl_1"})
    client2.jobs.create({"teacher_model_id": "mdl_1"})
    assert rec2.requests[0].headers["idempotency-key"] != rec2.requests[1].headers["idempotency-key"]


def test_a_callers_idempotency_key_is_sent_as_given():
    client, rec = sdk(replies(CREATED))
    client.jobs.create({"teacher_model_id": "mdl_1"}, idempotency_key="nightly-2025-01-01")
    assert rec.requests[0].headers["idempotency-key"] == "nightly-2025-01-01"


def test_an_upload_is_sent_whole_again_on_retry(tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"PK" + bytes(range(256)) * 40)
    model = {"id": "mdl_1", "name": "t", "format": "torchscript", "task": "classification", "size_bytes": 10242,
             "sha256": "ab", "num_parameters": 5, "created_at": "2025-01-01T00:00:00Z"}
    client, rec = sdk(replies(problem(503, "database_unavailable", "retry shortly", headers={"Retry-After": "5"}),
                              httpx.Response(201, json=model)))
    assert client.models.upload(teacher, name="t", task="classification").id == "mdl_1"
    first, second = (r.read() for r in rec.requests)
    assert teacher.read_bytes() in first and teacher.read_bytes() in second
    assert b'name="file"; filename="teacher.pt"' in second and b'name="task"' in second
    assert b'name="format"' not in second  # left out: the server detects it
    assert rec.requests[0].headers["idempotency-key"] == rec.requests[1].headers["idempotency-key"]
    assert rec.sleeps == [5.0]  # the server's Retry-After


def test_429_honours_retry_after_and_gives_up_after_max_retries():
    limited = problem(429, "rate_limited", "slow down", headers={"Retry-After": "2"})
    client, rec = sdk(replies(limited, limited, limited), max_retries=2)
    with pytest.raises(RateLimitError) as err:
        client.jobs.retrieve("job_1")
    assert err.value.retry_after == 2.0 and err.value.code == "rate_limited"
    assert rec.sleeps == [2.0, 2.0] and len(rec.requests) == 3


def test_backoff_grows_exponentially_with_jitter_when_the_server_names_no_wait():
    failures = [httpx.ConnectError("refused")] * 5
    client, rec = sdk(replies(*failures), max_retries=4)
    with pytest.raises(APIConnectionError, match="refused"):
        client.jobs.retrieve("job_1")
    assert len(rec.requests) == 5
    policy = RetryPolicy()
    for n, slept in enumerate(rec.sleeps):
        full = min(policy.max_delay, policy.base_delay * 2 ** n)
        assert full / 2 <= slept <= full, (n, slept)
    assert rec.sleeps[3] > rec.sleeps[0]


def test_an_http_date_retry_after_is_read():
    client, rec = sdk(replies(problem(503, "broker_unavailable", "x", headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
                              httpx.Response(200, json=job())))
    client.jobs.retrieve("job_1")
    assert rec.sleeps == [0.0]  # a date in the past: retry at once


def test_a_request_that_is_not_safe_to_repeat_is_not_retried_after_it_may_have_arrived():
    """webhooks.test queues one event per call: a 500 or a dropped answer is reported, not repeated."""
    client, rec = sdk(replies(problem(500, "internal_error", "boom")))
    with pytest.raises(ServerError, match="boom"):
        client.webhooks.test("wh_1")
    client, rec2 = sdk(replies(httpx.ReadError("reset")))
    with pytest.raises(APIConnectionError):
        client.webhooks.test("wh_1")
    assert len(rec.requests) == len(rec2.requests) == 1
    # ... but one that never reached the server is.
    client, rec3 = sdk(replies(httpx.ConnectError("refused"), httpx.Response(202, json={"delivery_id": "whd_1"})))
    assert client.webhooks.test("wh_1").delivery_id == "whd_1"
    assert len(rec3.requests) == 2


def test_a_create_still_in_flight_on_the_server_is_retried_until_its_response_replays():
    in_flight = problem(409, "idempotency_in_flight", "still in flight", headers={"Retry-After": "1"})
    client, rec = sdk(replies(httpx.ReadTimeout("slow"), in_flight, CREATED))
    assert client.jobs.create({"teacher_model_id": "mdl_1"}).id == "job_1"
    assert len({r.headers["idempotency-key"] for r in rec.requests}) == 1 and rec.sleeps[1] == 1.0


def test_client_errors_are_not_retried():
    client, rec = sdk(replies(problem(404, "not_found", "job job_9 not found")))
    with pytest.raises(Exception, match="job job_9 not found"):
        client.jobs.retrieve("job_9")
    assert len(rec.requests) == 1 and rec.sleeps == []
