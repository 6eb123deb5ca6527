"""The webhook series of ``/metrics``, read from the database, so every API process reports the same totals
whichever worker sent the deliveries."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import WebhookAttemptCount, WebhookDelivery
from app.webhooks.delivery import FAILED, PENDING, RESULTS, SUCCEEDED


def prometheus_lines(session: Session) -> list[str]:
    """``distillery_webhook_delivery_attempts_total{result}`` (a counter: every attempt's outcome) and
    ``distillery_webhook_deliveries{status}`` (a gauge: deliveries kept, by status)."""
    attempts = dict(session.execute(select(WebhookAttemptCount.result, WebhookAttemptCount.total)).all())
    statuses = dict(session.execute(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)).all())
    lines = ["# HELP distillery_webhook_delivery_attempts_total Webhook delivery attempts by how they ended.",
             "# TYPE distillery_webhook_delivery_attempts_total counter"]
    lines += [f'distillery_webhook_delivery_attempts_total{{result="{r}"}} {attempts.get(r, 0)}' for r in RESULTS]
    lines += ["# HELP distillery_webhook_deliveries Webhook deliveries in the database by status.",
              "# TYPE distillery_webhook_deliveries gauge"]
    lines += [f'distillery_webhook_deliveries{{status="{s}"}} {statuses.get(s, 0)}' for s in (PENDING, SUCCEEDED, FAILED)]
    return lines
