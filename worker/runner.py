"""Run one job: claim it, hand it to the engine, store what comes out, end it in a known state.

Idempotent by job id: the claim is a conditional ``queued → running`` update, so a duplicate
delivery (or a job cancelled before it started) does nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import traceback
from datetime import timedelta
from pathlib import Path

from sqlalchemy.exc import OperationalError

from app.clock import utcnow
from app.db.models import Artifact, Dataset, Job, Model
from app.db.session import session_scope
from app.ids import new_id
from app.jobs import state
from app.jobs.events import append_event
from app.settings import Settings, get_settings
from app.storage import get_storage
from worker import engine, supervisor
from worker.reporter import DbReporter, _jsonable

log = logging.getLogger("distillery.worker")
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def run_job(job_id: str, settings: Settings | None = None) -> str:
    """Execute ``job_id`` if it is still queued. Returns the status the job ended in (or 'skipped')."""
    settings = settings or get_settings()
    if not _claim(job_id, settings):
        return "skipped"
    work = settings.data_dir / "work" / job_id
    # Checkpoints live in blob storage under the job id, so a retry on any worker that shares it resumes
    # where the lost attempt stopped. (Local storage: a shared volume; an S3 backend would sync this dir.)
    checkpoints = get_storage().local_path(f"checkpoints/{job_id}")
    ended = "skipped"
    try:
        ended = _execute(job_id, settings, work, checkpoints)
        return ended
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if ended in state.TERMINAL:  # a finished job needs no resume point; an unfinished one keeps it
            shutil.rmtree(checkpoints, ignore_errors=True)


def _execute(job_id: str, settings: Settings, work: Path, checkpoints: Path) -> str:
    """Run the engine for a claimed job in a sandboxed executor and end the job in a known state."""
    reporter = DbReporter(job_id, settings.lease_seconds)
    try:
        inputs = _inputs(job_id)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        ending = supervisor.supervise(inputs, work, checkpoints, settings, reporter, reporter.should_stop)
    except _MissingInput as exc:
        return _end(job_id, state.FAILED, "input_missing", str(exc))
    except OperationalError:
        # The database went away mid-job: a transient failure, not the job's fault. Leave it running;
        # its lease expires, the reaper requeues it and the next attempt resumes from the checkpoint.
        log.exception("job %s lost its database connection; it will be retried", job_id)
        raise
    except Exception as exc:  # a bug or an environment failure: record it, never leave the job running
        log.exception("job %s crashed", job_id)
        return _end(job_id, state.FAILED, "internal_error", f"{exc.__class__.__name__}: {exc}",
                    data={"traceback": traceback.format_exc()[-4000:]})
    if isinstance(ending, supervisor.Stopped):
        # Cancelled (or taken away by the reaper, in which case the transition below does nothing).
        return _end(job_id, state.CANCELLED, "cancelled", "cancelled by the client")
    if isinstance(ending, supervisor.Failed):
        return _end(job_id, state.FAILED, ending.code, ending.message, data=ending.data or None)
    result = engine.EngineResult(artifacts=ending.artifacts, metrics=ending.metrics)
    if ending.status == "quality_gate":
        # Keep what the last step that met its budget produced, and the report that says which step broke it.
        return _fail_with_artifacts(job_id, engine.QualityGateFailed(ending.message, result))
    return _succeed(job_id, result)


class _MissingInput(Exception):
    pass


def _claim(job_id: str, settings: Settings) -> bool:
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; message dropped", job_id)
            return False
        now = utcnow()
        try:
            state.transition(s, job_id, state.RUNNING, allowed_from={state.QUEUED}, now=now,
                             attempts=Job.attempts + 1, worker_id=WORKER_ID, heartbeat_at=now,
                             lease_expires_at=now + timedelta(seconds=settings.lease_seconds))
        except state.InvalidTransition:
            log.info("job %s is %s, not queued; duplicate delivery ignored", job_id, job.status)
            return False
        append_event(s, job_id, "started", f"attempt {job.attempts + 1} started on {WORKER_ID}",
                     data={"attempt": job.attempts + 1, "worker": WORKER_ID, "device": settings.device})
    return True


def _inputs(job_id: str) -> supervisor.JobFiles:
    """Resolve every model and dataset the spec names to local files (storage keeps them by id)."""
    storage = get_storage()
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        spec = dict(job.spec)
        model = s.get(Model, spec["teacher_model_id"])
        if model is None:
            raise _MissingInput(f"teacher model {spec['teacher_model_id']} was deleted before the job ran")
        teacher = engine.TeacherSource(path=storage.local_path(model.storage_key), format=model.format,
                                       task=model.task, sha256=model.sha256, architecture=model.architecture)
        datasets = {}
        for ds_id in _dataset_ids(spec):
            ds = s.get(Dataset, ds_id)
            if ds is None:
                raise _MissingInput(f"dataset {ds_id} was deleted before the job ran")
            datasets[ds_id] = engine.DatasetSource(
                path=storage.local_path(ds.storage_key), format=ds.format, sha256=ds.sha256,
                inputs=tuple(ds.schema_.get("inputs", ["x"])), options=dict(ds.schema_.get("options") or {}))
        models = {}
        student_model = (spec.get("student") or {}).get("model_id")
        if student_model:
            m = s.get(Model, student_model)
            if m is None:
                raise _MissingInput(f"student model {student_model} was deleted before the job ran")
            models[m.id] = engine.ModelSource(path=storage.local_path(m.storage_key), format=m.format,
                                              architecture=m.architecture, sha256=m.sha256)
        return supervisor.JobFiles(spec, teacher, datasets, models)


def _dataset_ids(spec: dict) -> list[str]:
    ids = [spec.get("dataset_id"), spec.get("eval_dataset_id")] + [st.get("dataset_id") for st in spec["steps"]]
    return list(dict.fromkeys(i for i in ids if i))


def _store_blobs(job_id: str, artifacts: list[engine.ArtifactFile]) -> list[Artifact]:
    """Write every artifact's blob (first) and return the rows to insert with the status change."""
    storage = get_storage()
    rows = []
    for art in artifacts:
        art_id = new_id("artifact")
        filename = Path(art.path).name
        blob = storage.put_file(f"artifacts/{job_id}/{art_id}/{filename}", Path(art.path))
        rows.append(Artifact(id=art_id, tenant_id="", job_id=job_id, kind=art.kind, format=art.format,
                             step_index=art.step_index, filename=filename, media_type=art.media_type,
                             size_bytes=blob.size_bytes, sha256=blob.sha256, storage_key=blob.key))
    return rows


def _finish_with_artifacts(job_id: str, result: engine.EngineResult, to: str, message: str, *, level: str,
                           event_data: dict, **values) -> bool:
    """Move the job to ``to`` and attach ``result``'s artifacts in the same transaction (blobs written first).

    Returns False, keeping nothing, when the job had already moved on (a cancel arrived, or the reaper took it).
    """
    rows = _store_blobs(job_id, result.artifacts)
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        if to == state.SUCCEEDED:
            values["progress"] = dict(job.progress or {}, fraction=1.0, eta_seconds=0.0)
        try:
            # The state table narrows this further (only a running job can succeed).
            state.transition(s, job_id, to, allowed_from={state.RUNNING, state.CANCELLING},
                             metrics=_jsonable(result.metrics), **values)
        except state.InvalidTransition:
            finished = False
        else:
            finished = True
            for row in rows:
                row.tenant_id = job.tenant_id
                s.add(row)
            append_event(s, job_id, to, message, level=level, data=event_data)
    if not finished:
        for row in rows:
            get_storage().delete(row.storage_key)
    return finished


def _fail_with_artifacts(job_id: str, exc: engine.EngineError) -> str:
    """Fail the job with ``exc``'s code but keep the artifacts its ``result`` carries (quality gate)."""
    kept = len(exc.result.artifacts)
    if _finish_with_artifacts(job_id, exc.result, state.FAILED, exc.message, level="error",
                              event_data={"code": exc.code, "kept_artifacts": kept},
                              error_code=exc.code, error_message=exc.message):
        return state.FAILED
    return "skipped"  # cancelled or reaped meanwhile


def _succeed(job_id: str, result: engine.EngineResult) -> str:
    if _finish_with_artifacts(job_id, result, state.SUCCEEDED, f"job succeeded with {len(result.artifacts)} artifacts",
                              level="info", event_data={"metrics": _jsonable(result.metrics)}):
        return state.SUCCEEDED
    # A cancel arrived during the final phase: honour it, keep nothing.
    return _end(job_id, state.CANCELLED, "cancelled", "cancelled by the client")


def _end(job_id: str, to: str, code: str, message: str, data: dict | None = None) -> str:
    with session_scope() as s:
        try:
            state.transition(s, job_id, to, allowed_from={state.RUNNING, state.CANCELLING},
                             error_code=code, error_message=message)
        except state.InvalidTransition:
            log.warning("job %s could not move to %s (already moved on)", job_id, to)
            return "skipped"
        append_event(s, job_id, to, message, level="info" if to == state.CANCELLED else "error",
                     data={"code": code, **(data or {})})
    return to
