"""Response shapes of the public API (see API.md). Built from ORM rows by the ``*_out`` helpers."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field

from app.clock import rfc3339
from app.db.models import Dataset, JobEvent, JobMetric, Model, WebhookDelivery, WebhookEndpoint
# The job and artifact objects are the job domain's (webhook payloads carry them too); re-exported here.
from app.jobs.views import ArtifactOut, JobError, JobOut, artifact_out, job_out  # noqa: F401

T = TypeVar("T")


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[dict[str, Any]] | None = None


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool
    next_cursor: str | None


class ModelOut(BaseModel):
    id: str = Field(examples=["mdl_0194f3a2c1d2a1b2c3d4e5f6a7b8"])
    name: str
    format: str = Field(examples=["torchscript"])
    task: str = Field(examples=["classification"])
    size_bytes: int
    sha256: str
    num_parameters: int
    architecture: dict[str, Any] | None = None
    io_schema: dict[str, Any] | None = None
    created_at: str


class DatasetOut(BaseModel):
    id: str = Field(examples=["ds_0194f3a2c1d2a1b2c3d4e5f6a7b8"])
    name: str
    format: str = Field(examples=["npz"])
    num_rows: int
    size_bytes: int
    sha256: str
    has_labels: bool
    schema_: dict[str, Any] = Field(alias="schema", serialization_alias="schema")
    created_at: str


class EventOut(BaseModel):
    seq: int
    created_at: str
    level: str
    type: str
    message: str
    data: dict[str, Any] | None


class EventsOut(BaseModel):
    data: list[EventOut]


class MetricPointOut(BaseModel):
    step: int
    epoch: int
    name: str
    value: float


class MetricsOut(BaseModel):
    data: list[MetricPointOut]


class ArtifactsOut(BaseModel):
    data: list[ArtifactOut]


def model_out(m: Model) -> ModelOut:
    return ModelOut(id=m.id, name=m.name, format=m.format, task=m.task, size_bytes=m.size_bytes, sha256=m.sha256,
                    num_parameters=m.num_parameters, architecture=m.architecture, io_schema=m.io_schema,
                    created_at=rfc3339(m.created_at))


def dataset_out(d: Dataset) -> DatasetOut:
    return DatasetOut(id=d.id, name=d.name, format=d.format, num_rows=d.num_rows, size_bytes=d.size_bytes,
                      sha256=d.sha256, has_labels=d.has_labels, schema=d.schema_, created_at=rfc3339(d.created_at))


def event_out(e: JobEvent) -> EventOut:
    return EventOut(seq=e.seq, created_at=rfc3339(e.created_at), level=e.level, type=e.type, message=e.message,
                    data=e.data)


def metric_out(m: JobMetric) -> MetricPointOut:
    return MetricPointOut(step=m.step, epoch=m.epoch, name=m.name, value=m.value)


class WebhookOut(BaseModel):
    """A webhook endpoint. Its ``secret`` is shown once, in the response that creates it."""

    id: str = Field(examples=["wh_0194f3a2c1d2a1b2c3d4e5f6a7b8"])
    url: str = Field(examples=["https://hooks.example.com/distillery"])
    events: list[str] = Field(examples=[["job.succeeded", "job.failed"]])
    description: str | None = Field(examples=["notify the training pipeline"])
    enabled: bool
    disabled_reason: str | None = Field(description="Why deliveries stopped (a run of failed deliveries)",
                                        examples=[None])
    created_at: str


class WebhookCreatedOut(WebhookOut):
    secret: str = Field(description="Standard Webhooks signing secret; verify each delivery's "
                                    "`webhook-signature` with it. Shown only here.",
                        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw6TfmTbQz8Yc="])


class WebhookDeliveryOut(BaseModel):
    id: str = Field(examples=["whd_0194f3a2c1d2a1b2c3d4e5f6a7b8"])
    event_type: str = Field(examples=["job.succeeded"])
    message_id: str = Field(description="The `webhook-id` header: the same in every attempt of this delivery",
                            examples=["msg_0194f3a2c1d2a1b2c3d4e5f6a7b8"])
    status: str = Field(description="pending | succeeded | failed", examples=["pending"])
    attempt: int = Field(description="Attempts made (the one in flight included)", examples=[2])
    response_status: int | None = Field(examples=[500])
    latency_ms: float | None = Field(examples=[41.7])
    next_attempt_at: str | None = Field(description="When the next attempt is due (pending only)",
                                        examples=["2026-12-04T18:35:00Z"])
    last_error: str | None = Field(examples=["HTTP 500: upstream unavailable"])
    created_at: str


class WebhookTestOut(BaseModel):
    delivery_id: str = Field(examples=["whd_0194f3a2c1d2a1b2c3d4e5f6a7b8"])


def webhook_out(w: WebhookEndpoint) -> WebhookOut:
    return WebhookOut(id=w.id, url=w.url, events=list(w.events), description=w.description, enabled=w.enabled,
                      disabled_reason=w.disabled_reason, created_at=rfc3339(w.created_at))


def webhook_created_out(w: WebhookEndpoint) -> WebhookCreatedOut:
    return WebhookCreatedOut(**webhook_out(w).model_dump(), secret=w.secret)


def webhook_delivery_out(d: WebhookDelivery) -> WebhookDeliveryOut:
    return WebhookDeliveryOut(id=d.id, event_type=d.event_type, message_id=d.message_id, status=d.status,
                              attempt=d.attempt, response_status=d.response_status, latency_ms=d.latency_ms,
                              next_attempt_at=rfc3339(d.next_attempt_at) if d.status == "pending" else None,
                              last_error=d.last_error, created_at=rfc3339(d.created_at))
