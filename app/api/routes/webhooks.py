"""/v1/webhooks — endpoints that receive signed job events (Standard Webhooks), and their deliveries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.api.deps import CurrentPrincipal, Cursor, DbSession, IdempotencyKey, JsonObject, SettingsDep
from app.api.docs import problems
from app.api.schemas import (
    Page, WebhookCreatedOut, WebhookDeliveryOut, WebhookOut, WebhookTestOut, webhook_created_out,
    webhook_delivery_out, webhook_out,
)
from app.webhooks import service
from app.webhooks.service import WebhookCreate

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

_CREATE_DOC = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": WebhookCreate.model_json_schema(),
    "example": WebhookCreate.model_config["json_schema_extra"]["examples"][0]}}}}  # type: ignore[index]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=WebhookCreatedOut,
             responses=problems(401, 409, 413, 422), openapi_extra=_CREATE_DOC)
def create_webhook(response: Response, principal: CurrentPrincipal, db: DbSession, settings: SettingsDep,
                   idempotency_key: IdempotencyKey, body: JsonObject) -> WebhookCreatedOut:
    """Register an endpoint for job events. The answer carries the signing `secret` (`whsec_…`), shown only
    here (and when the same `Idempotency-Key` replays this request).

    The URL must be `https://` (`http://` where the deployment allows it) and its host must resolve to
    public addresses only: loopback, private, link-local (cloud metadata), CGNAT and other internal
    addresses answer 422 `invalid_webhook_url` unless the deployment allow-lists the host. The host is
    resolved, never connected to, here; it is checked again before every delivery."""
    endpoint, created = service.create_endpoint(db, settings, principal.tenant_id, body, idempotency_key)
    db.commit()
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return webhook_created_out(endpoint)


@router.get("", response_model=Page[WebhookOut], responses=problems(401, 422))
def list_webhooks(principal: CurrentPrincipal, db: DbSession, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                  after: Cursor = None) -> Page[WebhookOut]:
    """This tenant's endpoints, newest first (without their secrets)."""
    rows, has_more, cursor = service.list_endpoints(db, principal.tenant_id, limit=limit, after=after)
    return Page[WebhookOut](data=[webhook_out(r) for r in rows], has_more=has_more, next_cursor=cursor)


@router.get("/{webhook_id}", response_model=WebhookOut, responses=problems(401, 404))
def get_webhook(webhook_id: str, principal: CurrentPrincipal, db: DbSession) -> WebhookOut:
    """The endpoint (without its secret); `enabled: false` with `disabled_reason` once a run of deliveries
    failed."""
    return webhook_out(service.get_endpoint(db, principal.tenant_id, webhook_id))


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, responses=problems(401, 404))
def delete_webhook(webhook_id: str, principal: CurrentPrincipal, db: DbSession) -> Response:
    """Delete the endpoint and its deliveries; pending ones are not sent."""
    service.delete_endpoint(db, principal.tenant_id, webhook_id)
    db.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{webhook_id}/test", status_code=status.HTTP_202_ACCEPTED, response_model=WebhookTestOut,
             responses=problems(401, 404, 409))
def send_test_event(webhook_id: str, principal: CurrentPrincipal, db: DbSession) -> WebhookTestOut:
    """Enqueue a `webhook.test` event for the endpoint; follow it in `GET /v1/webhooks/{id}/deliveries`.
    A disabled endpoint answers 409 `webhook_disabled`."""
    delivery = service.send_test(db, principal.tenant_id, webhook_id)
    db.commit()
    return WebhookTestOut(delivery_id=delivery.id)


@router.get("/{webhook_id}/deliveries", response_model=Page[WebhookDeliveryOut], responses=problems(401, 404, 422))
def list_deliveries(webhook_id: str, principal: CurrentPrincipal, db: DbSession,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20, after: Cursor = None) -> Page[WebhookDeliveryOut]:
    """The endpoint's deliveries, newest first: status, attempts made, the last answer's status code and
    latency, the next retry and the last error."""
    rows, has_more, cursor = service.list_deliveries(db, principal.tenant_id, webhook_id, limit=limit, after=after)
    return Page[WebhookDeliveryOut](data=[webhook_delivery_out(r) for r in rows], has_more=has_more,
                                    next_cursor=cursor)
