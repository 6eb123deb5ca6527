"""ORM tables. The schema changes only through Alembic migrations (``migrations/``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.clock import utcnow
from app.db.base import Base


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # Only the SHA-256 of the key is stored; keys are 256-bit random so a slow hash adds nothing.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(32))
    architecture: Mapped[dict[str, Any] | None]
    io_schema: Mapped[dict[str, Any] | None]
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (Index("ix_models_tenant_created", "tenant_id", "created_at", "id"),)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(32))
    num_rows: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    has_labels: Mapped[bool]
    schema_: Mapped[dict[str, Any]] = mapped_column("schema")
    storage_key: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "created_at", "id"),)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), index=True)
    kind: Mapped[str] = mapped_column(String(64))  # step kinds joined by '+', for filtering
    # SET NULL: deleting an input later must not erase a finished job; the spec keeps the ids.
    teacher_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    spec: Mapped[dict[str, Any]]
    queue: Mapped[str] = mapped_column(String(32))
    progress: Mapped[dict[str, Any] | None]
    metrics: Mapped[dict[str, Any] | None]
    # {"mlflow": {"status", "run_id", "experiment_id", "model_version", "error"}} when the spec asks for tracking
    tracking: Mapped[dict[str, Any] | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    # A fresh random token per claimed attempt: every write of that attempt is conditional on it (fencing).
    lease_token: Mapped[str | None] = mapped_column(String(40))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # ---- student search (app/jobs/search.py, worker/search.py) ----
    # "search": a search job, advanced by the leader's coordinator and never claimed by a worker; "trial": one of
    # its child jobs (``parent_id``, ``trial_number``; ``trial`` holds the sampled params and, once known, the
    # trial's result and whether it was pruned); "job": every other job.
    role: Mapped[str] = mapped_column(String(16), default="job", server_default="job", index=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    trial_number: Mapped[int | None] = mapped_column(Integer)
    trial: Mapped[dict[str, Any] | None]
    __table_args__ = (Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
                      UniqueConstraint("parent_id", "trial_number", name="uq_jobs_parent_id"))


class JobInput(Base):
    """Every model and dataset a job reads (teacher, uploaded student, per-step and eval datasets), so a
    resource in use by an unfinished job cannot be deleted."""

    __tablename__ = "job_inputs"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(40), primary_key=True, index=True)
    role: Mapped[str] = mapped_column(String(32))


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(16))
    type: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),)


class JobMetric(Base):
    __tablename__ = "job_metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    format: Mapped[str] = mapped_column(String(32))
    step_index: Mapped[int | None] = mapped_column(Integer)
    filename: Mapped[str] = mapped_column(String(200))
    media_type: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dispatch(Base):
    """The outbox: a message to publish to the broker, written in the transaction that makes it due.

    The dispatcher (:mod:`worker.dispatcher`) publishes unsent rows oldest first and records ``sent_at``;
    a lost message is re-sent as a new row (``reason`` says why)."""

    __tablename__ = "dispatches"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))  # run_job (webhook events: webhook_deliveries)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    queue: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(32))  # created | requeued | released | resent | migrated
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
    tries: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (Index("ix_dispatches_unsent", "sent_at", "id"),)


class LeaderLease(Base):
    """Who leads a cluster-wide duty (``dispatcher``: the outbox, lost messages, the reaper) and until when.

    The leader renews ``expires_at`` well before it passes; anyone may take an expired lease. A new ``token``
    per tenure tells a leader that paused (SIGSTOP, a frozen VM) and came back that someone else led meanwhile."""

    __tablename__ = "leader_leases"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    token: Mapped[str] = mapped_column(String(40))
    expires_at: Mapped[datetime]


class IdempotencyRecord(Base):
    """Remembers which resource a creating POST with an ``Idempotency-Key`` produced."""

    __tablename__ = "idempotency_records"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEndpoint(Base):
    """A tenant's receiver of job events (Standard Webhooks). ``secret`` (``whsec_…``) signs every delivery, so
    it is kept as issued; the API shows it only in the response that creates the endpoint."""

    __tablename__ = "webhook_endpoints"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[Any]]
    description: Mapped[str | None] = mapped_column(String(500))
    secret: Mapped[str] = mapped_column(String(100))
    enabled: Mapped[bool] = mapped_column(default=True)
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    # Deliveries in a row that ended failed (every attempt used); a success resets it.
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (Index("ix_webhook_endpoints_tenant_created", "tenant_id", "created_at", "id"),)


class WebhookDelivery(Base):
    """The webhook outbox: one event for one endpoint, written in the transaction that makes it due (a job's
    transition), sent at least once by the leader's sender (:mod:`worker.webhooks`).

    ``attempt`` counts the attempts made, the one in flight included: claiming an attempt is the conditional
    ``attempt = attempt + 1`` that also pushes ``next_attempt_at`` past the attempt's time limit, and its
    outcome is written only while ``attempt`` still has the claimed value, so two senders never record the
    same attempt and a sender that died mid-attempt is retried once its claim runs out."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(40), unique=True)  # the webhook-id header
    # Plain JSON, not JSONB: PostgreSQL keeps the text as written, so the body keeps its key order.
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # pending | succeeded | failed
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    response_status: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
                      Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at", "id"))


class WebhookAttemptCount(Base):
    """How many delivery attempts ended with each ``result`` (``delivered``, ``http_error``, ``timeout``,
    ``connection_error``, ``refused``), across every sender process: ``/metrics`` reads it as a counter."""

    __tablename__ = "webhook_attempt_counts"
    result: Mapped[str] = mapped_column(String(32), primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger, default=0)
