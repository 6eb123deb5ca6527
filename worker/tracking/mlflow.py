"""The calls against an MLflow tracking server for one job: open its run, log metrics, complete it.

Every call blocks on the network (bounded by ``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``…_MAX_RETRIES``, set from
the settings by :mod:`worker.tracking`), so :class:`MlflowRun` is only ever driven from the tracker's own
thread, never from the job's path. mlflow is imported here lazily, on the first run a worker opens.

The server is shared by every tenant of the deployment, so a tenant may only write into what Distillery
created for it: experiments and registered models carry a ``distillery.tenant_id`` tag, and a name that
exists without this tenant's tag (another tenant's, or made outside Distillery) is refused
(:class:`TrackingRefused`) instead of written into — no tenant can add versions to another's model.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.jobs import state
from engine.values import ArtifactFile
from jobspec import MlflowTracking
from worker.tracking import model, names

TENANT_TAG = "distillery.tenant_id"
JOB_TAG = "distillery.job_id"
TEACHER_TAG = "distillery.teacher_sha256"
RUN_STATUS = {state.SUCCEEDED: "FINISHED", state.FAILED: "FAILED", state.CANCELLED: "KILLED"}
MAX_REPORT_BYTES = 32 << 20
#: Where each kind of job file goes in the run's artifacts ("" = the root).
ARTIFACT_DIRS = {"report": "", "model_card": "", "plot": "plots", "student": "student", "architecture": "student",
                 "dataset": "data"}
_BATCH_PARAMS, _BATCH_METRICS = 100, 1000  # MLflow's own per-request limits


class TrackingRefused(Exception):
    """The tracking server holds something this job may not write into, or the job has nothing to register."""


@dataclass(frozen=True)
class TrackedJob:
    """What the run is made from. ``spec``: the stored spec; ``request``: its ``tracking.mlflow``;
    ``previous_run_id``: the run an earlier attempt opened (reused); ``dataset_arrays``: the primary
    dataset's recorded ``schema.arrays`` (input dtypes for the signature)."""

    job_id: str
    tenant_id: str
    spec: dict[str, Any]
    request: MlflowTracking
    teacher_sha256: str
    dataset_arrays: dict[str, Any] | None = None
    previous_run_id: str | None = None


@dataclass
class Ending:
    """How the job ended (read back after its terminal transition) and the files it left."""

    status: str
    error_code: str | None = None
    error_message: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: list[ArtifactFile] = field(default_factory=list)


@dataclass(frozen=True)
class Point:
    key: str
    value: float
    step: int
    timestamp_ms: int


class MlflowRun:
    def __init__(self, tracking_uri: str, job: TrackedJob):
        from mlflow import MlflowClient

        self.job = job
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.artifact_uri: str | None = None

    # ---- opening ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the job's run (or take back the one an earlier attempt opened) and log the spec as params."""
        from mlflow.entities import Param

        self.experiment_id = self._experiment()
        if self._resume():
            return
        job = self.job
        run = self.client.create_run(self.experiment_id, run_name=job.request.run_name or job.job_id, tags={
            JOB_TAG: job.job_id, TENANT_TAG: job.tenant_id, TEACHER_TAG: job.teacher_sha256,
            "mlflow.source.name": "distillery", "mlflow.source.type": "JOB"})
        self.run_id, self.artifact_uri = run.info.run_id, run.info.artifact_uri
        params = [Param(k, v) for k, v in names.params(job.spec).items()]
        for i in range(0, len(params), _BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=params[i:i + _BATCH_PARAMS])

    def _resume(self) -> bool:
        from mlflow.exceptions import MlflowException

        if not self.job.previous_run_id:
            return False
        try:
            run = self.client.get_run(self.job.previous_run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False  # deleted on the server meanwhile: a new run
            raise
        if run.data.tags.get(JOB_TAG) != self.job.job_id or run.info.experiment_id != self.experiment_id:
            return False
        self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id, self.artifact_uri = run.info.run_id, run.info.artifact_uri
        return True

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.job.request.experiment
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, tags={TENANT_TAG: self.job.tenant_id})
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = self.client.get_experiment_by_name(name)  # created by a concurrent job
                if found is None:
                    raise
        self._owned(found.tags, f"experiment '{name}'")
        if found.lifecycle_stage != "active":
            raise TrackingRefused(f"experiment '{name}' is deleted on the tracking server; restore it there or "
                                  "choose another name")
        return found.experiment_id

    def _owned(self, tags: dict[str, str], what: str) -> None:
        if tags.get(TENANT_TAG) != self.job.tenant_id:
            raise TrackingRefused(f"{what} exists on the tracking server but was not created by Distillery for "
                                  "this tenant; choose another name")

    # ---- while the job runs ----------------------------------------------------------------------
    def log_metrics(self, points: list[Point]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(p.key, p.value, p.timestamp_ms, p.step) for p in points]
        for i in range(0, len(metrics), _BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + _BATCH_METRICS])

    # ---- the end ---------------------------------------------------------------------------------
    def finish(self, ending: Ending, *, await_seconds: int) -> str | None:
        """Final metrics, tags and files, the registered version (succeeded jobs with ``register``), then the
        run's end status. Returns the model version. The run is ended even when the registration is refused."""
        from mlflow.entities import Metric, RunTag

        report = _read_report(ending.artifacts)
        now = int(time.time() * 1000)
        final = final_metrics(ending.metrics, report)
        metrics = [Metric(k, v, now, 0) for k, v in final.items()]
        for i in range(0, len(metrics), _BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + _BATCH_METRICS])
        tags = {"distillery.status": ending.status}
        if ending.error_code:
            tags |= {"distillery.error_code": ending.error_code, "distillery.error": (ending.error_message or "")[:5000]}
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for art in ending.artifacts:
            self.client.log_artifact(self.run_id, str(art.path), ARTIFACT_DIRS.get(art.kind) or None)
        version, refused = None, None
        if self.job.request.register_ is not None and ending.status == state.SUCCEEDED:
            try:
                version = self._register(ending.artifacts, report, await_seconds)
            except TrackingRefused as exc:
                refused = exc
        self.client.set_terminated(self.run_id, RUN_STATUS[ending.status])
        if refused is not None:
            raise refused
        return version

    def _register(self, artifacts: list[ArtifactFile], report: dict[str, Any], await_seconds: int) -> str:
        name = self.job.request.register_.name  # type: ignore[union-attr]
        student = model.final_student(artifacts)
        if student is None:
            raise TrackingRefused("register: the job has no ONNX or TorchScript student to register (add 'onnx' "
                                  "or 'torchscript' to 'exports')")
        facts = model.model_facts(report, self.job.dataset_arrays)
        with tempfile.TemporaryDirectory(prefix="distillery-mlmodel-") as tmp:
            flavour = model.write_model(student, facts, Path(tmp) / "model", run_id=self.run_id or "")
            self.client.log_artifacts(self.run_id, str(Path(tmp) / "model"), "model")
        self._registered_model(name)
        version = self.client.create_model_version(
            name, source=f"{self.artifact_uri}/model", run_id=self.run_id,
            tags={JOB_TAG: self.job.job_id, TEACHER_TAG: self.job.teacher_sha256, TENANT_TAG: self.job.tenant_id,
                  "distillery.flavour": flavour},
            description=f"Student of Distillery job {self.job.job_id}", await_creation_for=await_seconds)
        return str(version.version)

    def _registered_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                self.client.create_registered_model(name, tags={TENANT_TAG: self.job.tenant_id},
                                                    description="Students distilled by Distillery")
                return
            except MlflowException as exc2:
                if exc2.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = self.client.get_registered_model(name)  # registered by a concurrent job
        self._owned(found.tags, f"registered model '{name}'")


def final_metrics(job_metrics: dict[str, Any], report: dict[str, Any]) -> dict[str, float]:
    """The job's final numbers as run metrics: ``teacher.*`` / ``student.*`` / ``baseline.*`` from the job's
    metrics and the report's rows (sizes, latency, task metrics), plus the report's ratios."""
    out: dict[str, float] = {}
    for side in ("teacher", "student", "baseline", "teacher_gain"):
        for source in (job_metrics.get(side), report.get(side)):
            if isinstance(source, dict):
                out |= names.numbers(source, side)
    out |= names.numbers({k: report.get(k) for k in ("compression_ratio", "parameter_ratio", "speedup")})
    return out


def _read_report(artifacts: list[ArtifactFile]) -> dict[str, Any]:
    """``report.json`` as written by the executor (untrusted): plain JSON, size-capped; {} when absent."""
    found = next((a for a in artifacts if a.kind == "report"), None)
    if found is None or Path(found.path).stat().st_size > MAX_REPORT_BYTES:
        return {}
    try:
        report = json.loads(Path(found.path).read_text())
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}
