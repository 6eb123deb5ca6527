"""The public representation of a job and of an artifact: what ``GET /v1/jobs/{id}`` and
``GET /v1/jobs/{id}/artifacts`` answer, and what webhook events carry (``app/webhooks/outbox.py``), built
from ORM rows in one place so the two never drift."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.clock import rfc3339
from app.db.models import Artifact, Job


class JobError(BaseModel):
    code: str
    message: str


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


def job_out(j: Job) -> JobOut:
    error = JobError(code=j.error_code, message=j.error_message or "") if j.error_code else None
    return JobOut(id=j.id, status=j.status, created_at=rfc3339(j.created_at), started_at=rfc3339(j.started_at),
                  finished_at=rfc3339(j.finished_at), spec=j.spec, progress=j.progress, metrics=j.metrics,
                  error=error, attempts=j.attempts)


def artifact_out(a: Artifact) -> ArtifactOut:
    return ArtifactOut(id=a.id, job_id=a.job_id, kind=a.kind, format=a.format, step_index=a.step_index,
                       filename=a.filename, size_bytes=a.size_bytes, sha256=a.sha256, created_at=rfc3339(a.created_at))
