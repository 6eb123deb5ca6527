"""Problem-details bodies become typed errors; lists follow cursors; objects tolerate fields they do not know."""

from __future__ import annotations

import json

import httpx
import pytest

from distillery_client import (APIError, AuthenticationError, ConflictError, Job, NotFoundError, ServerError,
                               ValidationError)
from tests.client.mock_api import job, problem, replies, sdk


@pytest.mark.parametrize("status,cls", [(401, AuthenticationError), (404, NotFoundError), (409, ConflictError),
                                        (500, ServerError), (418, APIError)])
def test_each_status_raises_its_error_with_the_servers_fields(status, cls):
    client, _ = sdk(replies(*[problem(status, "some_code", "a human sentence")] * 4))
    with pytest.raises(cls) as err:
        client.jobs.retrieve("job_1")
    assert type(err.value) is cls
    assert (err.value.status, err.value.code, err.value.detail) == (status, "some_code", "a human sentence")
    assert str(err.value) == f"a human sentence (some_code, HTTP {status})"


def test_422_carries_the_field_errors():
    errors = [{"loc": ["body", "steps", 0, "epochs"], "msg": "Input should be greater than 0", "type": "greater_than"},
              {"loc": ["body", "seed"], "msg": "Input should be a valid integer", "type": "int_parsing"}]
    client, _ = sdk(replies(problem(422, "validation_error", "body.steps.0.epochs: Input should be greater than 0",
                                    errors)))
    with pytest.raises(ValidationError) as err:
        client.jobs.create({"steps": [{"kind": "distill", "epochs": 0}], "seed": "x"})
    assert [e.field for e in err.value.errors] == ["body.steps.0.epochs", "body.seed"]
    assert err.value.errors[0].loc == ("body", "steps", 0, "epochs") and err.value.errors[1].type == "int_parsing"
    assert "body.seed: Input should be a valid integer" in str(err.value)


def test_a_body_that_is_not_problem_json_still_gives_a_readable_error():
    client, _ = sdk(replies(*[httpx.Response(502, text="<html>Bad Gateway</html>")] * 4))
    with pytest.raises(ServerError, match="Bad Gateway") as err:
        client.models.list().__next__()
    assert err.value.code is None


def test_list_follows_cursors_with_filters_and_stops_at_max_items():
    pages = {None: {"data": [job("job_3"), job("job_2")], "has_more": True, "next_cursor": "c2"},
             "c2": {"data": [job("job_1")], "has_more": False, "next_cursor": None}}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=pages[request.url.params.get("after")])

    client, rec = sdk(handler)
    jobs = client.jobs.list(status="failed", kind="distill", page_size=2)
    assert rec.requests == []  # lazy: nothing is fetched before iteration
    assert [j.id for j in jobs] == ["job_3", "job_2", "job_1"]
    assert [dict(r.url.params) for r in rec.requests] == [
        {"status": "failed", "kind": "distill", "limit": "2"},
        {"status": "failed", "kind": "distill", "limit": "2", "after": "c2"}]
    client, rec = sdk(handler)
    assert [j.id for j in client.jobs.list(max_items=1)] == ["job_3"]
    assert len(rec.requests) == 1 and rec.requests[0].url.params["limit"] == "1"


def test_objects_keep_unknown_fields_in_raw_and_take_defaults_for_missing_ones():
    body = job("job_1", "failed", error={"code": "shape_mismatch", "message": "20 features but 64", "hint": "x"},
               progress={"step_index": 0, "step_kind": "distill", "epoch": 2, "epochs": 5, "fraction": 0.4,
                         "eta_seconds": 3.0, "new_field": 1}, tracking={"mlflow": {"status": "ok"}})
    del body["attempts"]
    parsed = Job.from_dict(body)
    assert parsed.error.code == "shape_mismatch" and parsed.progress.epoch == 2 and parsed.attempts == 0
    assert parsed.raw["tracking"] == {"mlflow": {"status": "ok"}} and parsed.to_dict() is body
    assert parsed.done


def test_requests_carry_the_key_and_env_defaults(monkeypatch):
    monkeypatch.setenv("DISTILLERY_URL", "http://from-env:9000/")
    monkeypatch.setenv("DISTILLERY_API_KEY", "env-key")
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(204)

    from distillery_client import Client

    with Client(transport=httpx.MockTransport(handler)) as client:
        assert client.models.delete("mdl_1") is None
    assert str(seen[0].url) == "http://from-env:9000/v1/models/mdl_1" and seen[0].method == "DELETE"
    assert seen[0].headers["authorization"] == "Bearer env-key"
    assert seen[0].headers["user-agent"].startswith("distillery-client/")


def test_webhooks_follow_the_contract():
    hook = {"id": "wh_1", "url": "https://ci.example/hook", "events": ["job.succeeded"], "description": "ci",
            "enabled": True, "secret": "whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "created_at": "2025-01-01T00:00:00Z",
            "disabled_reason": None}
    delivery = {"id": "whd_1", "event_type": "job.succeeded", "message_id": "msg_1", "status": "failed", "attempt": 2,
                "response_status": 500, "latency_ms": 12.5, "next_attempt_at": "2025-01-01T00:05:00Z",
                "last_error": "HTTP 500", "created_at": "2025-01-01T00:00:00Z"}

    def handler(request: httpx.Request) -> httpx.Response:
        route = f"{request.method} {request.url.path}"
        if route == "POST /v1/webhooks":
            body = json.loads(request.content)
            if body["url"].startswith("http://169.254."):
                return problem(422, "invalid_webhook_url", "169.254.169.254 is link-local")
            assert body == {"url": hook["url"], "events": ["job.succeeded"], "description": "ci"}
            assert request.headers["idempotency-key"]
            return httpx.Response(201, json=hook)
        listing = {"data": [{k: v for k, v in hook.items() if k != "secret"}], "has_more": False, "next_cursor": None}
        return {"GET /v1/webhooks": httpx.Response(200, json=listing),
                "GET /v1/webhooks/wh_1/deliveries": httpx.Response(200, json={"data": [delivery], "has_more": False,
                                                                             "next_cursor": None})}[route]

    client, _ = sdk(handler)
    created = client.webhooks.create(hook["url"], events=["job.succeeded"], description="ci")
    assert created.secret.startswith("whsec_") and created.events == ["job.succeeded"]
    assert [w.secret for w in client.webhooks.list()] == [None]
    (d,) = client.webhooks.deliveries(created)
    assert (d.status, d.attempt, d.response_status, d.latency_ms, d.message_id) == ("failed", 2, 500, 12.5, "msg_1")
    with pytest.raises(ValidationError) as err:
        client.webhooks.create("http://169.254.169.254/")
    assert err.value.code == "invalid_webhook_url"
