"""The public representation of a job and of an artifact: what ``GET /v1/jobs/{id}`` and
``GET /v1/jobs/{id}/artifacts`` answer, and what webhook events carry (``app/webhooks/outbox.py``), built
from ORM rows in one place so the two never drift."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.clock import rfc3339
from app.db.models import Artifact, Job


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
    # ---- student search (docs/search.md) ----
    parent_id: str | None = Field(None, description="A search trial: the search job it belongs to.")
    trial: dict[str, Any] | None = Field(
        None, description="A search trial: its number, sampled params and, once it ended, its result.",
        examples=[{"number": 3, "params": {"family": "mlp", "mlp.hidden_layers": 1, "mlp.width": 48, "lr": 0.004},
                   "result": {"num_parameters": 3610, "latency_ms": 0.05, "metric": 0.969, "drop": 0.006}}])


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
                  error=error, attempts=j.attempts,
                  tracking=TrackingOut.model_validate(j.tracking) if j.tracking else None,
                  parent_id=j.parent_id, trial=j.trial)


def artifact_out(a: Artifact) -> ArtifactOut:
    return ArtifactOut(id=a.id, job_id=a.job_id, kind=a.kind, format=a.format, step_index=a.step_index,
                       filename=a.filename, size_bytes=a.size_bytes, sha256=a.sha256, created_at=rfc3339(a.created_at))


def queued_progress(spec: Any) -> dict[str, Any]:
    """A new job's ``progress`` (``spec``: its :class:`jobspec.JobSpec`): the first step, epoch 0 of that step's
    epochs — their upper bound when they are ``"auto"``, so ``epochs`` is always a number."""
    first = spec.steps[0]
    return {"step_index": 0, "step_kind": first.kind, "epoch": 0,
            "epochs": getattr(first, "max_epochs", getattr(first, "epochs", None)), "fraction": 0.0,
            "eta_seconds": None}

