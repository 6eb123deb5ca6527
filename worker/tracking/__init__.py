"""Experiment tracking of a job, from the trusted worker (never the sandboxed executor: it has no network).

:func:`open_tracker` is called right after a job is claimed and returns what the runner feeds: per-epoch
metrics (through the :class:`~worker.reporter.DbReporter`), the files the executor handed back
(:meth:`keep`), and the job's terminal status after its transition (:meth:`finish`). A job whose spec asks
for no tracking gets :class:`NoTracking`; one that asks while this worker cannot track (no
``DISTILLERY_MLFLOW_TRACKING_URI``, no mlflow package) runs untracked with state ``disabled`` and a warning
event saying ``tracking unavailable``. The MLflow calls themselves: :mod:`worker.tracking.tracker` (the
thread) and :mod:`worker.tracking.mlflow` (the client).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Protocol

from app.db.models import Dataset, Job, Model
from app.db.session import session_scope
from app.jobs.tracking import DISABLED, PENDING, mlflow_state
from app.settings import Settings
from engine.values import ArtifactFile
from jobspec import JobSpec
from worker.attempt import Attempt
from worker.tracking.journal import EVENT, Journal

log = logging.getLogger("distillery.worker")


class Tracker(Protocol):
    def metric(self, *, step: int, epoch: int, name: str, value: float) -> None: ...

    def keep(self, artifacts: list[ArtifactFile]) -> None: ...

    def finish(self, ended: str) -> None: ...

    def abandon(self) -> None: ...


class NoTracking:
    """The job is not tracked (or no longer: an earlier attempt's tracking failed or was disabled)."""

    def metric(self, *, step: int, epoch: int, name: str, value: float) -> None:
        pass

    def keep(self, artifacts: list[ArtifactFile]) -> None:
        pass

    def finish(self, ended: str) -> None:
        pass

    def abandon(self) -> None:
        pass


def open_tracker(attempt: Attempt, settings: Settings) -> Tracker:
    """The tracker of ``attempt``'s job; starts opening its MLflow run in the background. Never raises."""
    try:
        return _open(attempt, settings)
    except Exception:  # noqa: BLE001 - tracking never fails a job
        log.exception("job %s: tracking could not start; the job runs untracked", attempt.job_id)
        return NoTracking()


def _open(attempt: Attempt, settings: Settings) -> Tracker:
    from worker.tracking.mlflow import TrackedJob

    with session_scope() as s:
        job = s.get(Job, attempt.job_id)
        if job is None or job.tracking is None or (job.tracking.get("mlflow") or {}).get("status") != PENDING:
            return NoTracking()  # not asked for, or settled by an earlier attempt
        spec = JobSpec.model_validate(job.spec)
        teacher = s.get(Model, spec.teacher_model_id) if spec.teacher_model_id else None
        dataset = s.get(Dataset, spec.dataset_id or spec.heldout_dataset_id() or "")
        tracked = TrackedJob(job_id=job.id, tenant_id=job.tenant_id, spec=dict(job.spec),
                             request=spec.tracking.mlflow,  # type: ignore[union-attr]
                             teacher_sha256=teacher.sha256 if teacher is not None else "",
                             dataset_arrays=(dataset.schema_ or {}).get("arrays") if dataset is not None else None,
                             previous_run_id=job.tracking["mlflow"].get("run_id"))
    journal = Journal(attempt)
    unavailable = _unavailable(settings)
    if unavailable:
        journal.record(mlflow_state(DISABLED, error=unavailable), f"{unavailable}; the job runs untracked",
                       level="warning")
        journal.close()
        return NoTracking()
    _bound_calls(settings)
    from worker.tracking.tracker import MlflowTracker

    return MlflowTracker(tracked, settings.mlflow_tracking_uri or "", journal,
                         finish_seconds=settings.mlflow_finish_seconds, await_seconds=settings.mlflow_timeout_seconds)


def _unavailable(settings: Settings) -> str | None:
    if not settings.mlflow_tracking_uri:
        return "tracking unavailable: this worker has no DISTILLERY_MLFLOW_TRACKING_URI"
    if importlib.util.find_spec("mlflow") is None:
        return "tracking unavailable: the mlflow package is not installed on this worker (pip install 'distillery[mlflow]')"
    return None


def _bound_calls(settings: Settings) -> None:
    """Every MLflow HTTP call of this process gives up after the configured timeout and retries (the client
    reads these per call; its defaults — 120 s, 7 retries with doubling backoff — cost minutes per call)."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(settings.mlflow_timeout_seconds)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(settings.mlflow_max_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0.5"


__all__ = ["EVENT", "NoTracking", "Tracker", "open_tracker"]
