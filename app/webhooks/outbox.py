"""Webhook deliveries written in the caller's transaction: the outbox.

:func:`job_changed` runs inside :func:`app.jobs.state.transition` (and where a job is created), so a delivery
row commits with the status change or not at all: no event is lost when a process dies after the commit,
and none is sent for a change that rolled back. The leading worker's sender (:mod:`worker.webhooks`) sends
the rows later, at least once.

The payload is built now, from the row as the transition left it, so each event says what the job was at
that moment. A ``job.succeeded`` event also carries the job's artifacts and a summary of its report: the
worker adds the artifact rows in the same unit of work, before the transition.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.clock import rfc3339, utcnow
from app.db.models import Artifact, Job, WebhookDelivery, WebhookEndpoint
from app.ids import new_id
from app.jobs.views import artifact_out, job_out
from app.storage import get_storage

log = logging.getLogger("distillery.webhooks")

#: The event each job status announces (``cancelling`` announces nothing: the job has not stopped yet).
JOB_EVENTS = {"queued": "job.queued", "running": "job.running", "succeeded": "job.succeeded",
              "failed": "job.failed", "cancelled": "job.cancelled"}
EVENT_TYPES = tuple(JOB_EVENTS.values())
TEST_EVENT = "webhook.test"
#: A report larger than this is left out of the summary rather than read into the transaction.
MAX_REPORT_BYTES = 1024 * 1024
REPORT_SUMMARY_KEYS = ("teacher", "student", "compression_ratio", "parameter_ratio", "speedup")


def job_changed(session: Session, job_id: str, status: str, now: datetime | None = None) -> int:
    """Enqueue the event of ``job_id`` reaching ``status`` for every enabled endpoint of its tenant that
    subscribes to it; returns how many. Does not commit (the caller's unit of work does)."""
    event = JOB_EVENTS.get(status)
    if event is None:
        return 0
    endpoints = [ep for ep in session.scalars(
        select(WebhookEndpoint).join(Job, Job.tenant_id == WebhookEndpoint.tenant_id)
        .where(Job.id == job_id, WebhookEndpoint.enabled.is_(True))) if event in ep.events]
    if not endpoints:
        return 0
    # The UPDATE that changed the job bypassed the identity map: read the row as it now is.
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return 0
    data: dict[str, Any] = {"job": job_out(job).model_dump(mode="json")}
    if status == "succeeded":
        artifacts = list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)
                                         .order_by(Artifact.created_at, Artifact.id)))
        data["artifacts"] = [artifact_out(a).model_dump(mode="json") for a in artifacts]
        data["report"] = report_summary(artifacts)
    now = now or utcnow()
    for endpoint in endpoints:
        enqueue(session, endpoint.id, event, data, now)
    return len(endpoints)


def enqueue(session: Session, endpoint_id: str, event_type: str, data: dict[str, Any],
            now: datetime | None = None) -> WebhookDelivery:
    """One delivery of ``event_type`` to ``endpoint_id``, due at once, in the caller's transaction. The body is
    Standard Webhooks' ``{"type", "timestamp", "data"}``; ``message_id`` is its ``webhook-id``."""
    now = now or utcnow()
    row = WebhookDelivery(id=new_id("webhook_delivery"), endpoint_id=endpoint_id, event_type=event_type,
                          message_id=new_id("webhook_message"),
                          payload={"type": event_type, "timestamp": rfc3339(now), "data": data},
                          status="pending", attempt=0, next_attempt_at=now, created_at=now)
    session.add(row)
    return row


def report_summary(artifacts: list[Artifact]) -> dict[str, Any] | None:
    """The headline of the job's ``report.json`` (teacher and student rows, compression ratio, speedup); None
    when there is no report or it cannot be read: a webhook never fails the transition it announces."""
    report = next((a for a in artifacts if a.kind == "report" and a.format == "json"), None)
    if report is None or report.size_bytes > MAX_REPORT_BYTES:
        return None
    try:
        with get_storage().open(report.storage_key) as f:
            content = json.loads(f.read(MAX_REPORT_BYTES + 1))
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable blob leaves the summary out
        log.warning("report %s left out of the webhook payload (%s)", report.id, exc.__class__.__name__)
        return None
    if not isinstance(content, dict):
        return None
    return {k: content[k] for k in REPORT_SUMMARY_KEYS if k in content}
