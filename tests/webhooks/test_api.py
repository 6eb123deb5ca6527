"""/v1/webhooks: the secret shown once, tenancy, URL refusals (checked without connecting), paging,
idempotency, test events, deliveries, deletion, /metrics."""

from __future__ import annotations

import socket

import pytest

from tests.support.webhooks import insert_job, move


def test_create_shows_the_secret_once(client, endpoint, receiver):
    h, created = endpoint("api-secret", events=["job.succeeded", "job.failed", "job.succeeded"],
                          description="pipeline")
    assert created["id"].startswith("wh_") and created["secret"].startswith("whsec_")
    assert created["events"] == ["job.succeeded", "job.failed"]  # repeats dropped
    assert (created["enabled"], created["disabled_reason"], created["description"]) == (True, None, "pipeline")
    got = client.get(f"/v1/webhooks/{created['id']}", headers=h).json()
    listed = client.get("/v1/webhooks", headers=h).json()
    assert "secret" not in got and all("secret" not in w for w in listed["data"])
    assert got == {k: v for k, v in created.items() if k != "secret"} == listed["data"][0]
    assert created["secret"] not in client.get("/v1/webhooks", headers=h).text


def test_events_default_to_all_five_and_must_be_known(client, endpoint, make_key, receiver):
    _, created = endpoint("api-events")
    assert created["events"] == ["job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled"]
    h = make_key("api-events-bad")
    for events in (["job.exploded"], [], "job.queued"):
        r = client.post("/v1/webhooks", headers=h, json={"url": receiver.url, "events": events})
        assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
    r = client.post("/v1/webhooks", headers=h, json={"url": receiver.url, "colour": "red"})
    assert r.status_code == 422  # unknown fields


def test_another_tenants_webhook_is_not_found(client, endpoint, make_key):
    _, created = endpoint("api-owner")
    other = make_key("api-intruder")
    wh = created["id"]
    for method, path in (("GET", f"/v1/webhooks/{wh}"), ("DELETE", f"/v1/webhooks/{wh}"),
                         ("POST", f"/v1/webhooks/{wh}/test"), ("GET", f"/v1/webhooks/{wh}/deliveries"),
                         ("GET", "/v1/webhooks/wh_missing")):
        r = client.request(method, path, headers=other)
        assert r.status_code == 404 and r.json()["code"] == "not_found", (method, path, r.text)
    assert client.get("/v1/webhooks", headers=other).json()["data"] == []
    assert client.get("/v1/webhooks").status_code == 401


@pytest.mark.parametrize("url", ["https://127.0.0.1/x", "https://localhost/x", "https://169.254.169.254/latest",
                                 "https://[::ffff:127.0.0.1]/x", "http://hooks.example.com/x",
                                 "https://u:p@hooks.example.com/", "gopher://hooks.example.com/"])
def test_bad_urls_are_422_invalid_webhook_url(client, make_key, url):
    r = client.post("/v1/webhooks", headers=make_key("api-bad-url"), json={"url": url})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "invalid_webhook_url" and body["errors"][0]["loc"] == ["body", "url"]
    assert r.headers["content-type"].startswith("application/problem+json")


def test_a_loopback_url_is_refused_without_connecting_unless_allow_listed(client, make_key, hook_settings,
                                                                           monkeypatch):
    """A live listener on 127.0.0.1: registering its URL is refused, and no connection reached it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
        monkeypatch.setattr(hook_settings, "webhook_allowed_hosts", [])
        for candidate in (url, url.replace("127.0.0.1", "localhost")):
            r = client.post("/v1/webhooks", headers=make_key("api-loopback"), json={"url": candidate})
            assert r.status_code == 422 and "loopback" in r.json()["detail"], r.text
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
        monkeypatch.setattr(hook_settings, "webhook_allowed_hosts", ["127.0.0.1"])
        assert client.post("/v1/webhooks", headers=make_key("api-loopback"), json={"url": url}).status_code == 201
        with pytest.raises(BlockingIOError):
            listener.accept()  # registering connects nowhere even when allowed


def test_list_is_cursor_paged_newest_first(client, endpoint, make_key, receiver):
    h = make_key("api-pages")
    ids = [client.post("/v1/webhooks", headers=h, json={"url": receiver.url}).json()["id"] for _ in range(3)]
    first = client.get("/v1/webhooks", headers=h, params={"limit": 2}).json()
    assert [w["id"] for w in first["data"]] == ids[::-1][:2] and first["has_more"]
    rest = client.get("/v1/webhooks", headers=h, params={"limit": 2, "after": first["next_cursor"]}).json()
    assert [w["id"] for w in rest["data"]] == [ids[0]] and not rest["has_more"] and rest["next_cursor"] is None


def test_idempotent_create(client, make_key, receiver, hook_settings):
    h = {**make_key("api-idem"), "Idempotency-Key": "wh-1"}
    first = client.post("/v1/webhooks", headers=h, json={"url": receiver.url})
    again = client.post("/v1/webhooks", headers=h, json={"url": receiver.url})
    assert first.status_code == again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()  # the original response, secret included
    other = client.post("/v1/webhooks", headers=h, json={"url": receiver.url + "/other"})
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    assert len(client.get("/v1/webhooks", headers=h).json()["data"]) == 1


def test_test_event_deliveries_and_delete(client, endpoint, hook_settings, receiver):
    from app.webhooks.delivery import deliver_due
    from tests.support.webhooks import verify

    h, created = endpoint("api-test-event")
    r = client.post(f"/v1/webhooks/{created['id']}/test", headers=h)
    assert r.status_code == 202 and r.json()["delivery_id"].startswith("whd_")
    [pending] = client.get(f"/v1/webhooks/{created['id']}/deliveries", headers=h).json()["data"]
    assert (pending["id"], pending["status"], pending["attempt"], pending["event_type"]) == (
        r.json()["delivery_id"], "pending", 0, "webhook.test")
    assert pending["next_attempt_at"] is not None and pending["message_id"].startswith("msg_")
    assert deliver_due(hook_settings) == 1
    [done] = client.get(f"/v1/webhooks/{created['id']}/deliveries", headers=h).json()["data"]
    assert (done["status"], done["attempt"], done["response_status"], done["next_attempt_at"]) == (
        "succeeded", 1, 200, None)
    assert done["latency_ms"] > 0 and done["last_error"] is None
    [request] = receiver.requests
    event = verify(created["secret"], request)
    assert event["type"] == "webhook.test" and event["data"]["webhook_id"] == created["id"]
    assert request.headers["webhook-id"] == done["message_id"] and request.path == "/hooks/distillery"
    assert request.headers["user-agent"].startswith("Distillery-Webhooks/")
    assert request.headers["content-type"] == "application/json"

    assert client.delete(f"/v1/webhooks/{created['id']}", headers=h).status_code == 204
    assert client.get(f"/v1/webhooks/{created['id']}", headers=h).status_code == 404
    assert client.get(f"/v1/webhooks/{created['id']}/deliveries", headers=h).status_code == 404
    job = insert_job(h)
    move(job, "running")  # no endpoint left: nothing is enqueued, nothing sent
    assert deliver_due(hook_settings) == 0 and len(receiver.requests) == 1


def test_job_queued_fires_when_a_job_is_created(client, endpoint, uploaded, hook_settings, receiver):
    from app.webhooks.delivery import deliver_due
    from tests.support.jobs import job_body
    from tests.support.webhooks import verify

    h, created = endpoint("api-queued", events=["job.queued"])
    m, d = uploaded(h)
    job = client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()
    assert deliver_due(hook_settings) == 1
    event = verify(created["secret"], receiver.requests[0])
    assert event["type"] == "job.queued" and event["data"] == {"job": job}
    assert event["timestamp"].endswith("Z")


def test_metrics_count_attempts_by_result(client, endpoint, hook_settings, receiver):
    from app.webhooks.delivery import deliver_due

    def series() -> dict[str, float]:
        text = client.get("/metrics").text
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line.startswith("distillery_webhook")}

    before = series()
    h, created = endpoint("api-metrics")
    receiver.answers = [500]
    client.post(f"/v1/webhooks/{created['id']}/test", headers=h)
    deliver_due(hook_settings)
    deliver_due(hook_settings)
    after = series()
    assert after['distillery_webhook_delivery_attempts_total{result="http_error"}'] == \
        before['distillery_webhook_delivery_attempts_total{result="http_error"}'] + 1
    assert after['distillery_webhook_delivery_attempts_total{result="delivered"}'] == \
        before['distillery_webhook_delivery_attempts_total{result="delivered"}'] + 1
    assert {'distillery_webhook_deliveries{status="pending"}', 'distillery_webhook_deliveries{status="failed"}'} <= set(after)


def test_the_openapi_document_describes_the_routes_with_examples(client):
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    assert {"/v1/webhooks", "/v1/webhooks/{webhook_id}", "/v1/webhooks/{webhook_id}/test",
            "/v1/webhooks/{webhook_id}/deliveries"} <= set(paths)
    create = paths["/v1/webhooks"]["post"]
    assert "secret" in create["description"] and "invalid_webhook_url" in create["description"]
    assert create["requestBody"]["content"]["application/json"]["example"]["url"].startswith("https://")
    assert "422" in create["responses"] and "201" in create["responses"]
    assert doc["components"]["schemas"]["WebhookCreatedOut"]["properties"]["secret"]["examples"]
