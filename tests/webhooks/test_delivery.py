"""Job transitions reach a real receiver, signed; failures retry on the schedule; endpoints that keep failing
are disabled; every attempt re-checks the URL and connects to the address that passed; claims are fenced."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from tests.support.api import make_artifact
from tests.support.webhooks import HANG, deliveries, drain, insert_job, move, verify


def test_each_transition_sends_its_event_with_the_job_as_the_api_shows_it(client, endpoint, hook_settings,
                                                                           receiver):
    h, created = endpoint("dlv-events")
    job = insert_job(h)
    move(job, "running", attempts=1)
    running_view = client.get(f"/v1/jobs/{job}", headers=h).json()
    art = make_artifact(job, b"student bytes")
    move(job, "succeeded", metrics={"student": {"accuracy": 0.9}})
    done_view = client.get(f"/v1/jobs/{job}", headers=h).json()
    drain(hook_settings, lambda: len(receiver.requests) == 2, "two events")
    running, succeeded = (verify(created["secret"], r) for r in receiver.requests)
    assert running == {"type": "job.running", "timestamp": running["timestamp"], "data": {"job": running_view}}
    assert succeeded["type"] == "job.succeeded" and succeeded["data"]["job"] == done_view
    assert succeeded["data"]["artifacts"] == client.get(f"/v1/jobs/{job}/artifacts", headers=h).json()["data"]
    assert succeeded["data"]["artifacts"][0]["id"] == art
    assert succeeded["data"]["report"] is None  # this job has no report artifact
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert len(set(ids)) == 2 and {d["message_id"] for d in deliveries(client, h, created["id"])} == set(ids)

    other = insert_job(h)
    move(other, "cancelled")
    failing = insert_job(h)
    move(failing, "running")
    move(failing, "cancelling")  # no event: the job has not stopped yet
    move(failing, "failed", error_code="worker_lost", error_message="gone")
    drain(hook_settings, lambda: len(receiver.requests) == 5, "three more events")
    types = [json.loads(r.body)["type"] for r in receiver.requests[2:]]
    assert types == ["job.cancelled", "job.running", "job.failed"]
    assert verify(created["secret"], receiver.requests[4])["data"]["job"]["error"] == {"code": "worker_lost",
                                                                                         "message": "gone"}


def test_only_subscribed_events_of_enabled_endpoints_of_the_jobs_tenant(client, endpoint, hook_settings, receiver):
    from app.db.models import WebhookDelivery
    from app.db.session import session_scope

    h, only_failed = endpoint("dlv-subscribed", events=["job.failed"])
    endpoint("dlv-other-tenant")  # another tenant's endpoint hears nothing of this tenant's jobs
    job = insert_job(h)
    move(job, "running")
    move(job, "failed", error_code="internal_error", error_message="x")
    with session_scope() as s:
        rows = s.query(WebhookDelivery).all()
        mine = [d for d in rows if d.endpoint_id == only_failed["id"]]
        assert [d.event_type for d in mine] == ["job.failed"]
        assert all(d.payload["data"]["job"]["id"] != job for d in rows if d.endpoint_id != only_failed["id"])


def test_an_event_rolls_back_with_its_transition(client, endpoint, hook_settings):
    from app.db.models import WebhookDelivery
    from app.db.session import get_sessionmaker
    from app.jobs import state

    h, created = endpoint("dlv-rollback")
    job = insert_job(h)
    with get_sessionmaker()() as s:
        state.transition(s, job, "running")
        assert s.query(WebhookDelivery).filter_by(endpoint_id=created["id"]).count() == 1  # in the same session
        s.rollback()
    with get_sessionmaker()() as s:
        assert s.query(WebhookDelivery).filter_by(endpoint_id=created["id"]).count() == 0


def test_a_receiver_answering_500_twice_gets_the_event_on_the_third_attempt(client, endpoint, hook_settings,
                                                                             receiver):
    h, created = endpoint("dlv-retry")
    receiver.answers = [500, 503]
    move(insert_job(h), "running")
    drain(hook_settings, lambda: [r.answered for r in receiver.requests] == [500, 503, 200], "three attempts")
    for request in receiver.requests:
        assert verify(created["secret"], request)["type"] == "job.running"  # each attempt signed afresh
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1  # one message, three attempts
    [d] = deliveries(client, h, created["id"])
    assert (d["status"], d["attempt"], d["response_status"], d["last_error"]) == ("succeeded", 3, 200, None)


def test_a_delivery_fails_after_the_last_attempt_and_the_schedule_sets_each_retry(client, endpoint, hook_settings,
                                                                                   receiver, monkeypatch):
    from app.clock import utcnow
    from app.webhooks.delivery import deliver_due

    h, created = endpoint("dlv-schedule")
    receiver.default = 500
    monkeypatch.setattr(hook_settings, "webhook_retry_schedule", [600.0, 3600.0])
    move(insert_job(h), "running")
    assert deliver_due(hook_settings) == 1
    [d] = deliveries(client, h, created["id"])
    assert (d["status"], d["attempt"], d["response_status"]) == ("pending", 1, 500)
    assert d["last_error"] == "HTTP 500: receiver says no"
    assert deliver_due(hook_settings) == 0  # not due for 10 minutes
    later = utcnow() + timedelta(seconds=601)
    assert deliver_due(hook_settings, now=later) == 1
    [d] = deliveries(client, h, created["id"])
    assert d["attempt"] == 2 and d["status"] == "pending"
    assert deliver_due(hook_settings, now=later + timedelta(seconds=3601)) == 1
    [d] = deliveries(client, h, created["id"])
    assert (d["status"], d["attempt"], d["next_attempt_at"]) == ("failed", 3, None)
    assert len(receiver.requests) == 3


def test_an_endpoint_is_disabled_after_a_run_of_failed_deliveries(client, endpoint, hook_settings, receiver,
                                                                  monkeypatch):
    from app.webhooks.delivery import deliver_due

    monkeypatch.setattr(hook_settings, "webhook_retry_schedule", [])  # one attempt each
    monkeypatch.setattr(hook_settings, "webhook_disable_after_failures", 2)
    h, created = endpoint("dlv-disable")
    receiver.answers = [500, 200, 500, 500]
    for _ in range(2):  # failed, then succeeded: the run starts again
        client.post(f"/v1/webhooks/{created['id']}/test", headers=h)
        deliver_due(hook_settings)
    assert client.get(f"/v1/webhooks/{created['id']}", headers=h).json()["enabled"] is True
    for _ in range(2):
        client.post(f"/v1/webhooks/{created['id']}/test", headers=h)
        deliver_due(hook_settings)
    got = client.get(f"/v1/webhooks/{created['id']}", headers=h).json()
    assert got["enabled"] is False and "2 deliveries in a row failed" in got["disabled_reason"]
    assert "HTTP 500" in got["disabled_reason"]
    r = client.post(f"/v1/webhooks/{created['id']}/test", headers=h)
    assert r.status_code == 409 and r.json()["code"] == "webhook_disabled"
    move(insert_job(h), "running")  # a disabled endpoint gets no new events
    assert deliver_due(hook_settings) == 0 and len(receiver.requests) == 4


def test_pending_deliveries_of_an_endpoint_disabled_meanwhile_are_failed_unsent(client, endpoint, hook_settings,
                                                                                 receiver):
    from app.db.models import WebhookEndpoint
    from app.db.session import session_scope
    from app.webhooks.delivery import deliver_due

    h, created = endpoint("dlv-disabled-pending")
    client.post(f"/v1/webhooks/{created['id']}/test", headers=h)
    with session_scope() as s:
        s.get(WebhookEndpoint, created["id"]).enabled = False
    assert deliver_due(hook_settings) == 0 and receiver.requests == []
    [d] = deliveries(client, h, created["id"])
    assert d["status"] == "failed" and "disabled" in d["last_error"]


def test_redirects_are_not_followed_and_answers_are_read_bounded(client, endpoint, hook_settings, receiver):
    from app.webhooks.delivery import deliver_due

    h, created = endpoint("dlv-redirect")
    receiver.answers = [{"status": 307, "headers": {"location": "http://169.254.169.254/latest/meta-data"}},
                        {"status": 500, "body": b"x" * (8 << 20)}, {"status": 200, "body": b"y" * (8 << 20)}]
    client.post(f"/v1/webhooks/{created['id']}/test", headers=h)
    deliver_due(hook_settings)
    [d] = deliveries(client, h, created["id"])
    assert d["response_status"] == 307 and "redirects are not followed" in d["last_error"]
    assert "169.254.169.254" in d["last_error"] and len(receiver.requests) == 1  # the Location was never visited
    deliver_due(hook_settings)
    [d] = deliveries(client, h, created["id"])
    assert d["response_status"] == 500 and len(d["last_error"]) < 400  # an excerpt of the 8 MiB answer
    deliver_due(hook_settings)
    [d] = deliveries(client, h, created["id"])
    assert d["status"] == "succeeded"  # 2xx decides; the rest of the body is never downloaded


def test_a_receiver_that_does_not_answer_times_out_and_is_retried(client, endpoint, hook_settings, receiver,
                                                                  monkeypatch):
    from app.webhooks.delivery import deliver_due

    monkeypatch.setattr(hook_settings, "webhook_timeout_seconds", 0.3)
    h, created = endpoint("dlv-timeout")
    receiver.answers = [HANG]
    client.post(f"/v1/webhooks/{created['id']}/test", headers=h)
    deliver_due(hook_settings)
    receiver.release()
    [d] = deliveries(client, h, created["id"])
    assert (d["status"], d["attempt"], d["response_status"]) == ("pending", 1, None)
    assert d["last_error"].startswith("timed out")
    drain(hook_settings, lambda: deliveries(client, h, created["id"])[0]["status"] == "succeeded", "the retry")


def test_every_attempt_rechecks_the_url(client, endpoint, hook_settings, receiver, monkeypatch):
    """Allowed when registered, refused at delivery (the allow-list changed): nothing connects to it."""
    from app.webhooks.delivery import deliver_due

    h, created = endpoint("dlv-recheck")
    client.post(f"/v1/webhooks/{created['id']}/test", headers=h)
    monkeypatch.setattr(hook_settings, "webhook_allowed_hosts", [])
    deliver_due(hook_settings)
    [d] = deliveries(client, h, created["id"])
    assert d["status"] == "pending" and d["response_status"] is None
    assert d["last_error"].startswith("not sent:") and "loopback" in d["last_error"]
    assert receiver.connections == 0


def test_the_connection_goes_to_the_checked_address_with_the_host_kept(client, make_key, hook_settings, receiver,
                                                                       monkeypatch):
    """DNS rebinding: the name resolves to a public address at registration and to loopback at delivery;
    the delivery is refused without connecting. An allow-listed name is sent to the address it resolved to,
    with its own name in ``Host``."""
    from app.webhooks import policy
    from app.webhooks.delivery import deliver_due

    answers = {"rebind.example": ["93.184.216.34"], "receiver.example": ["127.0.0.1"]}
    monkeypatch.setattr(policy, "resolve_host", lambda host, port, timeout: answers[host])
    port = receiver.url.split(":")[2].split("/")[0]
    h = make_key("dlv-pinned")
    rebind = client.post("/v1/webhooks", headers=h, json={"url": f"http://rebind.example:{port}/in"}).json()
    monkeypatch.setattr(hook_settings, "webhook_allowed_hosts", ["127.0.0.1", "receiver.example"])
    pinned = client.post("/v1/webhooks", headers=h, json={"url": f"http://receiver.example:{port}/in"}).json()
    answers["rebind.example"] = ["127.0.0.1"]
    move(insert_job(h), "running")
    deliver_due(hook_settings)
    [request] = receiver.requests
    assert request.headers["host"] == f"receiver.example:{port}" and receiver.connections == 1
    assert verify(pinned["secret"], request)["type"] == "job.running"
    [refused] = deliveries(client, h, rebind["id"])
    assert refused["status"] == "pending" and "resolves to 127.0.0.1" in refused["last_error"]


def test_claims_are_conditional_and_outcomes_fenced_by_the_attempt(client, endpoint, hook_settings, receiver):
    from app.clock import utcnow
    from app.webhooks import delivery

    h, created = endpoint("dlv-claims")
    client.post(f"/v1/webhooks/{created['id']}/test", headers=h)
    client.post(f"/v1/webhooks/{created['id']}/test", headers=h)
    [first] = delivery.claim_due(hook_settings, 10)
    assert first.attempt == 1
    assert delivery.claim_due(hook_settings, 10, busy={created["id"]}) == []  # one in flight per endpoint
    [second] = delivery.claim_due(hook_settings, 10)  # the other delivery; the claimed one is no longer due
    assert second.delivery_id != first.delivery_id
    assert delivery.claim_due(hook_settings, 10) == []
    # The first sender vanished; once its claim has run out another one takes the next attempt...
    later = utcnow() + timedelta(seconds=delivery.claim_seconds(hook_settings) + 1)
    [again] = [c for c in delivery.claim_due(hook_settings, 10, now=later) if c.delivery_id == first.delivery_id]
    assert again.attempt == 2
    # ...and whatever the vanished one reports afterwards is ignored.
    assert delivery.record(first, delivery.Outcome("http_error", 500, 1.0, "late"), hook_settings) is None
    assert delivery.record(again, delivery.send(again, hook_settings), hook_settings) == "succeeded"
    assert delivery.record(again, delivery.Outcome("delivered", 200, 1.0), hook_settings) is None  # once only
    d = next(d for d in deliveries(client, h, created["id"]) if d["id"] == first.delivery_id)
    assert (d["status"], d["attempt"], d["last_error"]) == ("succeeded", 2, None)


@pytest.mark.parametrize("status", [199, 300, 404])
def test_only_2xx_counts_as_delivered(client, endpoint, hook_settings, receiver, status):
    from app.webhooks.delivery import deliver_due

    h, created = endpoint(f"dlv-status-{status}")
    receiver.answers = [status] if status != 199 else [{"status": 204}]
    client.post(f"/v1/webhooks/{created['id']}/test", headers=h)
    deliver_due(hook_settings)
    [d] = deliveries(client, h, created["id"])
    assert d["status"] == ("succeeded" if status == 199 else "pending")
