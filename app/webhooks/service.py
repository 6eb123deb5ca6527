"""Webhook endpoints and their deliveries, for the API: register (URL checked against the SSRF rules), list,
read, delete, send a test event. Every read is tenant-scoped: another tenant's endpoint is "not found"."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import idempotency
from app.clock import utcnow
from app.db.models import WebhookDelivery, WebhookEndpoint
from app.errors import Conflict, NotFound
from app.ids import new_id
from app.pagination import paginate
from app.settings import Settings
from app.webhooks import outbox, policy, signing

EventType = Literal["job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled"]
assert set(EventType.__args__) == set(outbox.EVENT_TYPES)  # type: ignore[attr-defined]


class WebhookCreate(BaseModel):
    """``POST /v1/webhooks``: where to send which events."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"url": "https://hooks.example.com/distillery", "events": ["job.succeeded", "job.failed"],
         "description": "notify the training pipeline"}]})
    url: str = Field(description="An https:// URL whose host resolves to public addresses only (see the "
                                 "webhook section of docs/integration.md); at most 2048 characters.")
    events: list[EventType] = Field(default_factory=lambda: list(outbox.EVENT_TYPES), min_length=1,
                                    description="The job events to send; default all five.")
    description: str | None = Field(None, max_length=500)

    @field_validator("events")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


def create_endpoint(session: Session, settings: Settings, tenant_id: str, body: dict[str, Any],
                    idempotency_key: str | None) -> tuple[WebhookEndpoint, bool]:
    """Validate ``body``, check its URL (resolving the host, connecting nowhere) and store a new endpoint with
    a fresh secret. Returns (endpoint, created); created is False when an identical request is replayed."""
    req = idempotency.request_hash(body)
    if (prior := idempotency.lookup(session, tenant_id, "webhooks", idempotency_key, req)) is not None:
        return get_endpoint(session, tenant_id, prior), False
    spec = WebhookCreate.model_validate(body)
    policy.check(spec.url, settings)
    endpoint_id = new_id("webhook")
    if (prior := idempotency.claim(session, tenant_id, "webhooks", idempotency_key, req, endpoint_id)) is not None:
        return get_endpoint(session, tenant_id, prior), False
    endpoint = WebhookEndpoint(id=endpoint_id, tenant_id=tenant_id, url=spec.url, events=list(spec.events),
                               description=spec.description, secret=signing.new_secret(), enabled=True,
                               consecutive_failures=0, created_at=utcnow())
    session.add(endpoint)
    session.flush()
    return endpoint, True


def get_endpoint(session: Session, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    row = session.get(WebhookEndpoint, endpoint_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no webhook {endpoint_id}")
    return row


def list_endpoints(session: Session, tenant_id: str, *, limit: int,
                   after: str | None) -> tuple[list[WebhookEndpoint], bool, str | None]:
    return paginate(session, select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id), WebhookEndpoint,
                    limit, after)


def delete_endpoint(session: Session, tenant_id: str, endpoint_id: str) -> None:
    """Delete the endpoint and its deliveries (pending ones are never sent). Does not commit."""
    session.delete(get_endpoint(session, tenant_id, endpoint_id))
    session.flush()


def list_deliveries(session: Session, tenant_id: str, endpoint_id: str, *, limit: int,
                    after: str | None) -> tuple[list[WebhookDelivery], bool, str | None]:
    get_endpoint(session, tenant_id, endpoint_id)
    return paginate(session, select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id),
                    WebhookDelivery, limit, after)


def send_test(session: Session, tenant_id: str, endpoint_id: str) -> WebhookDelivery:
    """Enqueue a ``webhook.test`` event for the endpoint (409 ``webhook_disabled`` when it is disabled)."""
    endpoint = get_endpoint(session, tenant_id, endpoint_id)
    if not endpoint.enabled:
        raise Conflict(f"webhook {endpoint_id} is disabled ({endpoint.disabled_reason}); create it again to "
                       "resume deliveries", code="webhook_disabled")
    return outbox.enqueue(session, endpoint.id, outbox.TEST_EVENT,
                          {"webhook_id": endpoint.id, "message": "a test event from Distillery"})
