"""Send webhook deliveries: claim the due ones, make one attempt each, record what happened.

Only the leading worker sends (:mod:`worker.webhooks`); the claim is conditional anyway, so a leader change
cannot make two processes send the same attempt in normal operation:

* :func:`claim_due` — per endpoint with something due, its oldest due delivery (one in flight per endpoint,
  so one slow receiver holds one sending slot, never the loop); each claim is
  ``UPDATE … SET attempt = attempt + 1, next_attempt_at = now + claim time WHERE attempt = <seen> …``.
  A sender that dies mid-attempt leaves the row to be claimed again once that time has passed (at least once).
* :func:`send` — one attempt: the URL is checked again (:mod:`app.webhooks.policy`) and the connection goes
  to the address that passed; a JSON body signed per Standard Webhooks; redirects are not followed; at most
  :data:`MAX_RESPONSE_BYTES` of the answer are read. 2xx is success; anything else, a timeout or a
  connection error is a failed attempt.
* :func:`record` — written only while the row still carries the claimed attempt: succeeded; or retried at
  the schedule's next time; or failed after the last attempt, which counts against the endpoint
  (disabled after ``DISTILLERY_WEBHOOK_DISABLE_AFTER_FAILURES`` failed deliveries in a row).
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import httpx
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app import __version__
from app.clock import utcnow
from app.db.models import WebhookAttemptCount, WebhookDelivery, WebhookEndpoint
from app.db.session import session_scope
from app.settings import Settings
from app.webhooks import policy, schedule, signing

log = logging.getLogger("distillery.webhooks")

PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"
#: How an attempt ended (the ``result`` label of ``distillery_webhook_delivery_attempts_total``).
RESULTS = ("delivered", "http_error", "timeout", "connection_error", "refused")
#: Bytes of a receiver's answer that are read at most (the rest is never downloaded).
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = f"Distillery-Webhooks/{__version__}"


@dataclass(frozen=True)
class Claim:
    """One attempt this process owns: ``attempt`` is its number (1 for the first)."""

    delivery_id: str
    endpoint_id: str
    attempt: int
    url: str
    secret: str
    message_id: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended: ``result`` (one of :data:`RESULTS`), the HTTP status if an answer came, the
    time to the end of the answer, and why it failed (None on success)."""

    result: str
    status_code: int | None = None
    latency_ms: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == "delivered"


def claim_seconds(settings: Settings) -> float:
    """How long a claimed attempt keeps its row from other senders: past any attempt's own time limit."""
    return 3 * settings.webhook_timeout_seconds + 2.0


def claim_due(settings: Settings, limit: int, busy: frozenset[str] | set[str] = frozenset(),
              now: datetime | None = None) -> list[Claim]:
    """Claim up to ``limit`` due deliveries, at most one per endpoint and none for the endpoints in ``busy``
    (those this process is sending to), oldest due first. Pending deliveries of disabled endpoints are
    failed on the way."""
    now = now or utcnow()
    with session_scope() as s:
        _fail_disabled(s)
        oldest = (select(WebhookDelivery.endpoint_id, func.min(WebhookDelivery.next_attempt_at).label("due"))
                  .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                  .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now,
                         WebhookEndpoint.enabled.is_(True))
                  .group_by(WebhookDelivery.endpoint_id).order_by("due").limit(limit + len(busy)))
        endpoints = [r.endpoint_id for r in s.execute(oldest) if r.endpoint_id not in busy][:limit]
    claims = []
    for endpoint_id in endpoints:
        with session_scope() as s:
            row = s.execute(select(WebhookDelivery.id, WebhookDelivery.attempt, WebhookDelivery.message_id,
                                   WebhookDelivery.payload, WebhookEndpoint.url, WebhookEndpoint.secret)
                            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                            .where(WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.status == PENDING,
                                   WebhookDelivery.next_attempt_at <= now)
                            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id).limit(1)).first()
            if row is None:
                continue
            taken = s.execute(update(WebhookDelivery)
                              .where(WebhookDelivery.id == row.id, WebhookDelivery.status == PENDING,
                                     WebhookDelivery.attempt == row.attempt)
                              .values(attempt=row.attempt + 1,
                                      next_attempt_at=now + timedelta(seconds=claim_seconds(settings)))
                              .execution_options(synchronize_session=False)).rowcount == 1
        if taken:
            claims.append(Claim(row.id, endpoint_id, row.attempt + 1, row.url, row.secret, row.message_id,
                                row.payload))
    return claims


def _fail_disabled(s: Session) -> None:
    disabled = select(WebhookEndpoint.id).where(WebhookEndpoint.enabled.is_(False))
    # Read first: on SQLite even an UPDATE that matches nothing takes the write lock, every pass.
    if s.scalar(select(WebhookDelivery.id).where(WebhookDelivery.status == PENDING,
                                                 WebhookDelivery.endpoint_id.in_(disabled)).limit(1)) is None:
        return
    s.execute(update(WebhookDelivery)
              .where(WebhookDelivery.status == PENDING, WebhookDelivery.endpoint_id.in_(disabled))
              .values(status=FAILED, next_attempt_at=None, last_error="not sent: the endpoint is disabled")
              .execution_options(synchronize_session=False))


@lru_cache(maxsize=1)
def _tls() -> ssl.SSLContext:
    return httpx.create_ssl_context()


def body_of(payload: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed) for ``payload``."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def send(claim: Claim, settings: Settings, resolve: policy.Resolver | None = None) -> Outcome:
    """Make one attempt of ``claim`` and say how it ended (never raises for network trouble)."""
    try:
        dest = policy.check(claim.url, settings, resolve)
    except policy.UrlRefused as exc:
        return Outcome("refused", error=f"not sent: {exc.detail}")
    body = body_of(claim.payload)
    headers = {**signing.signed_headers(claim.secret, claim.message_id, int(time.time()), body),
               "content-type": "application/json", "user-agent": USER_AGENT, "host": dest.host_header}
    # The original host name for TLS: SNI and certificate verification (the URL names the pinned address).
    extensions = {"sni_hostname": dest.host} if dest.scheme == "https" and dest.host_is_name else {}
    timeout = settings.webhook_timeout_seconds
    began = time.monotonic()
    try:
        # trust_env=False: no proxy from the environment may carry the request somewhere else.
        with httpx.Client(verify=_tls(), trust_env=False, follow_redirects=False, timeout=timeout,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            with client.stream("POST", dest.pinned_url, content=body, headers=headers,
                               extensions=extensions) as response:
                excerpt = _read_bounded(response, began + 2 * timeout)
    except httpx.TimeoutException as exc:
        return Outcome("timeout", latency_ms=_ms(began), error=f"timed out ({exc.__class__.__name__}) after "
                                                               f"{_ms(began) / 1000:.1f} s")
    except (httpx.HTTPError, OSError) as exc:
        return Outcome("connection_error", latency_ms=_ms(began), error=f"{exc.__class__.__name__}: {exc}"[:500])
    status = response.status_code
    if 200 <= status < 300:
        return Outcome("delivered", status, _ms(began))
    where = f" to {response.headers.get('location', '')[:200]!r} (redirects are not followed)" \
        if 300 <= status < 400 else ""
    text = excerpt.decode("utf-8", "replace").strip()[:300]
    return Outcome("http_error", status, _ms(began), f"HTTP {status}{where}" + (f": {text}" if text else ""))


def _read_bounded(response: httpx.Response, deadline: float) -> bytes:
    """At most :data:`MAX_RESPONSE_BYTES` of the raw (undecoded) answer, reading no longer than ``deadline``."""
    got = bytearray()
    for chunk in response.iter_raw():
        got += chunk
        if len(got) >= MAX_RESPONSE_BYTES or time.monotonic() > deadline:
            break
    return bytes(got[:MAX_RESPONSE_BYTES])


def _ms(began: float) -> float:
    return round((time.monotonic() - began) * 1000, 3)


def record(claim: Claim, outcome: Outcome, settings: Settings, now: datetime | None = None) -> str | None:
    """Write ``outcome`` for ``claim`` if the row still carries that attempt; returns the delivery's new status
    (None when the attempt was no longer ours: another sender took it over, or the endpoint was deleted)."""
    now = now or utcnow()
    values: dict[str, Any] = {"response_status": outcome.status_code, "latency_ms": outcome.latency_ms,
                              "last_error": outcome.error}
    if outcome.ok:
        values.update(status=SUCCEEDED, delivered_at=now, next_attempt_at=None)
    elif (retry := schedule.retry_at(now, claim.attempt, settings.webhook_retry_schedule)) is not None:
        values.update(status=PENDING, next_attempt_at=retry)
    else:
        values.update(status=FAILED, next_attempt_at=None)
    with session_scope() as s:
        if s.execute(update(WebhookDelivery)
                     .where(WebhookDelivery.id == claim.delivery_id, WebhookDelivery.attempt == claim.attempt,
                            WebhookDelivery.status == PENDING)
                     .values(**values).execution_options(synchronize_session=False)).rowcount != 1:
            return None
        _count(s, outcome.result)
        if values["status"] == SUCCEEDED:
            s.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == claim.endpoint_id,
                                                    WebhookEndpoint.consecutive_failures != 0)
                      .values(consecutive_failures=0).execution_options(synchronize_session=False))
        elif values["status"] == FAILED:
            _count_failure(s, claim.endpoint_id, outcome, settings)
    return values["status"]


def _count(s: Session, result: str) -> None:
    bump = (update(WebhookAttemptCount).where(WebhookAttemptCount.result == result)
            .values(total=WebhookAttemptCount.total + 1).execution_options(synchronize_session=False))
    if s.execute(bump).rowcount == 0:
        s.add(WebhookAttemptCount(result=result, total=1))


def _count_failure(s: Session, endpoint_id: str, outcome: Outcome, settings: Settings) -> None:
    """One more delivery of the endpoint failed every attempt; past the limit the endpoint is disabled."""
    s.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id)
              .values(consecutive_failures=WebhookEndpoint.consecutive_failures + 1)
              .execution_options(synchronize_session=False))
    limit = settings.webhook_disable_after_failures
    endpoint = s.get(WebhookEndpoint, endpoint_id, populate_existing=True)
    if not limit or endpoint is None or not endpoint.enabled or endpoint.consecutive_failures < limit:
        return
    endpoint.enabled = False
    endpoint.disabled_reason = (f"disabled after {endpoint.consecutive_failures} deliveries in a row failed every "
                                f"attempt; the last: {outcome.error}")[:1000]
    log.warning("webhook endpoint %s disabled after %d failed deliveries", endpoint_id,
                endpoint.consecutive_failures)


def deliver_due(settings: Settings, limit: int | None = None, now: datetime | None = None,
                resolve: policy.Resolver | None = None) -> int:
    """One pass, in this thread: claim, send and record up to ``limit`` due deliveries (default
    ``DISTILLERY_WEBHOOK_CONCURRENCY``); returns how many attempts were made. The leader's sender does the
    same with a pool of threads."""
    claims = claim_due(settings, limit or settings.webhook_concurrency, now=now)
    for claim in claims:
        record(claim, send(claim, settings, resolve), settings)
    return len(claims)
