"""What a job's ``tracking`` field says about its run on an experiment tracker (MLflow).

The API stores the first state when it queues a job that asks for tracking; the worker (worker/tracking/)
moves it on. ``status``: ``pending`` (the run is being written, or not started yet), ``logged`` (the run is
complete and ended with the job's outcome), ``failed`` (the tracker was unreachable or refused a call: the
job itself is unaffected, ``error`` says what happened), ``disabled`` (no run will be written: the worker
has no tracker or no MLflow client, or the job ended before it ran).
"""

from __future__ import annotations

from typing import Any

from app.errors import Unprocessable
from app.settings import Settings
from jobspec import JobSpec

PENDING, LOGGED, FAILED, DISABLED = "pending", "logged", "failed", "disabled"
STATUSES = (PENDING, LOGGED, FAILED, DISABLED)


def mlflow_state(status: str, *, run_id: str | None = None, experiment_id: str | None = None,
                 model_version: str | None = None, error: str | None = None) -> dict[str, Any]:
    """The ``tracking`` column's value for a job tracked in MLflow."""
    assert status in STATUSES, status
    return {"mlflow": {"status": status, "run_id": run_id, "experiment_id": experiment_id,
                       "model_version": model_version, "error": error}}


def initial_state(spec: JobSpec) -> dict[str, Any] | None:
    """What a new job's ``tracking`` holds: pending when its spec asks for a tracker, else nothing."""
    return mlflow_state(PENDING) if spec.tracking is not None else None


def check_available(spec: JobSpec, settings: Settings) -> None:
    """422 ``tracking_unavailable`` before 202 when the job asks for a tracker this deployment does not have."""
    if spec.tracking is not None and not settings.mlflow_tracking_uri:
        raise Unprocessable("tracking.mlflow: this deployment has no MLflow tracking server "
                            "(DISTILLERY_MLFLOW_TRACKING_URI is not set); remove 'tracking' or ask the operator "
                            "to configure one", code="tracking_unavailable")


def never_ran(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """The state of a job cancelled while queued: with no run created yet, none will be. (A job released back
    to the queue keeps the run an earlier attempt opened: it stays as it was.)"""
    if not state or "mlflow" not in state or state["mlflow"].get("run_id"):
        return state
    return mlflow_state(DISABLED, error="the job ended before it ran; no run was created")
