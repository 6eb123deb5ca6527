"""``client.webhooks``: endpoints that receive signed job events (Standard Webhooks) — ``/v1/webhooks``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from distillery_client.resources._base import MAX_PAGE_SIZE, Resource, idempotency_headers, object_id
from distillery_client.types import Webhook, WebhookDelivery, WebhookTest

#: What a webhook can subscribe to (the default: all of them).
JOB_EVENTS = ("job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled")


class Webhooks(Resource):
    def create(self, url: str, *, events: Sequence[str] | None = None, description: str | None = None,
               idempotency_key: str | None = None) -> Webhook:
        """Register ``url`` for ``events`` (default: every job event). The answer's ``secret`` (``whsec_…``) is
        shown this once: keep it to verify the ``webhook-signature`` header. A URL the server's policy refuses
        raises :class:`~distillery_client.ValidationError` with code ``invalid_webhook_url``."""
        body = {"url": url, "events": list(events) if events is not None else None, "description": description}
        return self._run(self._call("POST", "/v1/webhooks", Webhook.from_dict,
                                    json={k: v for k, v in body.items() if v is not None},
                                    headers=idempotency_headers(idempotency_key)))

    def list(self, *, page_size: int = MAX_PAGE_SIZE, max_items: int | None = None) -> Iterator[Webhook]:
        return self._iter(self._pages("/v1/webhooks", Webhook.from_dict, page_size=page_size, max_items=max_items))

    def retrieve(self, webhook_id: str | Webhook) -> Webhook:
        return self._run(self._call("GET", f"/v1/webhooks/{object_id(webhook_id)}", Webhook.from_dict))

    def delete(self, webhook_id: str | Webhook) -> None:
        return self._run(self._call("DELETE", f"/v1/webhooks/{object_id(webhook_id)}"))

    def test(self, webhook_id: str | Webhook) -> WebhookTest:
        """Queue a ``webhook.test`` event to it; follow the delivery with :meth:`deliveries`."""
        # Not replayed after a lost answer: each call queues one more test event.
        return self._run(self._call("POST", f"/v1/webhooks/{object_id(webhook_id)}/test", WebhookTest.from_dict,
                                    replayable=False))

    def deliveries(self, webhook_id: str | Webhook, *, page_size: int = MAX_PAGE_SIZE,
                   max_items: int | None = None) -> Iterator[WebhookDelivery]:
        """Its deliveries, newest first: status, attempts made, the receiver's status code, latency, next retry."""
        return self._iter(self._pages(f"/v1/webhooks/{object_id(webhook_id)}/deliveries", WebhookDelivery.from_dict,
                                      page_size=page_size, max_items=max_items))
