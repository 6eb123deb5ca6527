"""Response shapes of the public API (see API.md). Built from ORM rows by the ``*_out`` helpers."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from app.clock import rfc3339
from app.db.models import Artifact, Dataset, Job, JobEvent, JobMetric, Model

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


class JobError(BaseModel):
    code: str
    message: str


class MlflowTrackingOut(BaseModel):
    status: Literal["pending", "logged", "failed", "disabled"] = Field(
        description="pending: the run is being written (or the job has not started); logged: the run is complete "
                    "and ended with the job's outcome; failed: the tracker was unreachable or refused a call (the "
                    "job is unaffected; see error and the job's events); disabled: no run will be written.")
    run_id: str | None = None
    experiment_id: str | None = None
    model_version: str | None = Field(None, description="The registered version, with tracking.mlflow.register.")
    error: str | None = None


class TrackingOut(BaseModel):
    mlflow: MlflowTrackingOut | None = None


class JobOut(BaseModel):
    id: str = Field(examples=["job_0194f3a2c1d2a1b2c3d4e5f6a7b8"])
    status: str = Field(examples=["running"])
    created_at: str
    started_at: str | None
    finished_at: str | None
    spec: dict[str, Any]
    progress: dict[str, Any] | None = Field(
        examples=[{"step_index": 0, "step_kind": "distill", "epoch": 3, "epochs": 20, "fraction": 0.15,
                   "eta_seconds": 42.0}])
    metrics: dict[str, Any] | None = Field(
        examples=[{"teacher": {"accuracy": 0.97}, "student": {"accuracy": 0.95, "agreement": 0.96}}])
    error: JobError | None
    attempts: int
    tracking: TrackingOut | None = Field(
        None, description="Present when the spec asks for 'tracking': what became of the job's run there.",
        examples=[{"mlflow": {"status": "logged", "run_id": "5f0c3e2a9b7d4c1e8f6a2b3c4d5e6f70", "experiment_id": "1",
                              "model_version": "3", "error": None}}])


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


class ArtifactOut(BaseModel):
    id: str = Field(examples=["art_0194f3a2c1d2a1b2c3d4e5f6a7b8"])
    job_id: str
    kind: str = Field(examples=["student"])
    format: str = Field(examples=["onnx"])
    step_index: int | None
    filename: str
    size_bytes: int
    sha256: str
    created_at: str


class ArtifactsOut(BaseModel):
    data: list[ArtifactOut]


def model_out(m: Model) -> ModelOut:
    return ModelOut(id=m.id, name=m.name, format=m.format, task=m.task, size_bytes=m.size_bytes, sha256=m.sha256,
                    num_parameters=m.num_parameters, architecture=m.architecture, io_schema=m.io_schema,
                    created_at=rfc3339(m.created_at))


def dataset_out(d: Dataset) -> DatasetOut:
    return DatasetOut(id=d.id, name=d.name, format=d.format, num_rows=d.num_rows, size_bytes=d.size_bytes,
                      sha256=d.sha256, has_labels=d.has_labels, schema=d.schema_, created_at=rfc3339(d.created_at))


def job_out(j: Job) -> JobOut:
    error = JobError(code=j.error_code, message=j.error_message or "") if j.error_code else None
    return JobOut(id=j.id, status=j.status, created_at=rfc3339(j.created_at), started_at=rfc3339(j.started_at),
                  finished_at=rfc3339(j.finished_at), spec=j.spec, progress=j.progress, metrics=j.metrics,
                  error=error, attempts=j.attempts,
                  tracking=TrackingOut.model_validate(j.tracking) if j.tracking else None)


def event_out(e: JobEvent) -> EventOut:
    return EventOut(seq=e.seq, created_at=rfc3339(e.created_at), level=e.level, type=e.type, message=e.message,
                    data=e.data)


def metric_out(m: JobMetric) -> MetricPointOut:
    return MetricPointOut(step=m.step, epoch=m.epoch, name=m.name, value=m.value)


def artifact_out(a: Artifact) -> ArtifactOut:
    return ArtifactOut(id=a.id, job_id=a.job_id, kind=a.kind, format=a.format, step_index=a.step_index,
                       filename=a.filename, size_bytes=a.size_bytes, sha256=a.sha256, created_at=rfc3339(a.created_at))
