"""Signatures as the ``standardwebhooks`` library verifies them, and the retry schedule."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from app.webhooks import schedule, signing


def test_secrets_are_whsec_base64_of_32_random_bytes():
    a, b = signing.new_secret(), signing.new_secret()
    assert a.startswith("whsec_") and a != b
    assert len(base64.b64decode(a.removeprefix("whsec_"))) == 32


def test_the_library_verifies_our_signature_and_agrees_on_its_value():
    secret, body, now = signing.new_secret(), '{"type":"job.succeeded","data":{"é":1}}'.encode(), int(time.time())
    headers = signing.signed_headers(secret, "msg_1", now, body)
    assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded", "data": {"é": 1}}
    assert headers["webhook-signature"] == Webhook(secret).sign("msg_1", datetime.fromtimestamp(now, UTC), body)


@pytest.mark.parametrize("tamper", ["body", "id", "timestamp", "secret"])
def test_any_change_fails_verification(tamper):
    secret, body, now = signing.new_secret(), b'{"type":"job.failed"}', int(time.time())
    headers = signing.signed_headers(secret, "msg_1", now, body)
    if tamper == "body":
        body = b'{"type":"job.succeeded"}'
    elif tamper == "id":
        headers["webhook-id"] = "msg_2"
    elif tamper == "timestamp":
        headers["webhook-timestamp"] = str(now - 1)
    else:
        secret = signing.new_secret()
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, headers)


def test_an_old_signature_is_refused_by_receivers():
    secret, body = signing.new_secret(), b"{}"
    headers = signing.signed_headers(secret, "msg_1", int(time.time()) - 600, body)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(body, headers)


def test_the_default_schedule_is_standard_webhooks_own():
    from app.settings import DEFAULT_WEBHOOK_RETRY_SCHEDULE, Settings

    s = Settings().webhook_retry_schedule
    assert s == DEFAULT_WEBHOOK_RETRY_SCHEDULE == [5, 300, 1800, 7200, 18000, 36000]
    assert schedule.max_attempts(s) == 7
    now = datetime(2026, 1, 1, tzinfo=UTC)
    delays = [schedule.retry_at(now, n, s) - now for n in range(1, 7)]
    assert delays == [timedelta(seconds=d) for d in s]
    assert schedule.retry_at(now, 7, s) is None  # the 7th attempt was the last
    assert sum(s) / 3600 == pytest.approx(17.6, abs=0.1)


def test_the_schedule_is_configurable(monkeypatch):
    from app.settings import Settings

    monkeypatch.setenv("DISTILLERY_WEBHOOK_RETRY_SCHEDULE", "1, 2.5")
    assert Settings().webhook_retry_schedule == [1.0, 2.5]
    monkeypatch.setenv("DISTILLERY_WEBHOOK_RETRY_SCHEDULE", "[]")
    assert schedule.max_attempts(Settings().webhook_retry_schedule) == 1
    monkeypatch.setenv("DISTILLERY_WEBHOOK_RETRY_SCHEDULE", "-1")
    with pytest.raises(ValueError):
        Settings()
