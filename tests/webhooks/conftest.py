"""Fixtures of the webhook tests: a recording receiver on 127.0.0.1 (allow-listed, over http) and the
settings that let deliveries reach it quickly."""

from __future__ import annotations

import pytest

from tests.support.webhooks import Receiver


@pytest.fixture()
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture()
def hook_settings(backend, monkeypatch):
    """This process's settings with the receiver reachable: http allowed, 127.0.0.1 allow-listed, a short
    timeout and an immediate retry schedule (three attempts). Endpoints left by earlier tests are deleted
    first: their deliveries would otherwise be sent by this test's passes (the database is the session's)."""
    from app.db.models import WebhookDelivery, WebhookEndpoint
    from app.db.session import session_scope
    from app.settings import get_settings

    with session_scope() as db:
        db.execute(WebhookDelivery.__table__.delete())
        db.execute(WebhookEndpoint.__table__.delete())

    s = get_settings()
    for name, value in {"webhook_allow_http": True, "webhook_allowed_hosts": ["127.0.0.1"],
                        # 10 s: a receiver thread starved by a loaded machine must not turn an answer into a
                        # timeout (and a second request); the tests about timeouts set their own.
                        "webhook_timeout_seconds": 10.0, "webhook_retry_schedule": [0.0, 0.0],
                        "webhook_disable_after_failures": 5}.items():
        monkeypatch.setattr(s, name, value)
    return s


@pytest.fixture()
def endpoint(client, make_key, receiver, hook_settings):
    """``endpoint(tenant, **fields)`` → (headers, created webhook JSON with its secret) pointing at the receiver."""

    def make(tenant: str = "hooks", **fields):
        h = make_key(tenant)
        r = client.post("/v1/webhooks", headers=h, json={"url": receiver.url, **fields})
        assert r.status_code == 201, r.text
        return h, r.json()

    return make
