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

from app.clock import utcnow
from app.db.models import Artifact, Dataset, Job, Model
from app.db.session import session_scope
from app.ids import new_id
from app.jobs import state
from app.jobs.events import append_event
from app.settings import Settings, get_settings
from app.storage import get_storage
from worker import engine
from worker.reporter import DbReporter, _jsonable

log = logging.getLogger("distillery.worker")
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def run_job(job_id: str, settings: Settings | None = None) -> str:
    """Execute ``job_id`` if it is still queued. Returns the status the job ended in (or 'skipped')."""
    settings = settings or get_settings()
    if not _claim(job_id, settings):
        return "skipped"
    reporter = DbReporter(job_id, settings.lease_seconds)
    work = settings.data_dir / "work" / job_id
    try:
        spec, teacher, dataset = _inputs(job_id)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        result = engine.run(spec, teacher, dataset, work, reporter, device=settings.device,
                            threads=settings.worker_threads)
        return _succeed(job_id, result)
    except engine.Cancelled:
        return _end(job_id, state.CANCELLED, "cancelled", "cancelled by the client")
    except engine.EngineError as exc:
        return _end(job_id, state.FAILED, exc.code, exc.message)
    except _MissingInput as exc:
        return _end(job_id, state.FAILED, "input_missing", str(exc))
    except Exception as exc:  # a bug or an environment failure: record it, never leave the job running
        log.exception("job %s crashed", job_id)
        return _end(job_id, state.FAILED, "internal_error", f"{exc.__class__.__name__}: {exc}",
                    data={"traceback": traceback.format_exc()[-4000:]})
    finally:
        shutil.rmtree(work, ignore_errors=True)


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


def _inputs(job_id: str) -> tuple[dict, engine.TeacherSource, engine.DatasetSource]:
    storage = get_storage()
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        model = s.get(Model, job.teacher_model_id) if job.teacher_model_id else None
        dataset = s.get(Dataset, job.dataset_id) if job.dataset_id else None
        if model is None:
            raise _MissingInput(f"teacher model {job.spec['teacher_model_id']} was deleted before the job ran")
        if dataset is None:
            raise _MissingInput(f"dataset {job.spec['dataset_id']} was deleted before the job ran")
        teacher = engine.TeacherSource(path=storage.local_path(model.storage_key), format=model.format,
                                       task=model.task, sha256=model.sha256)
        data = engine.DatasetSource(path=storage.local_path(dataset.storage_key), format=dataset.format,
                                    sha256=dataset.sha256, inputs=tuple(dataset.schema_.get("inputs", ["x"])))
        return dict(job.spec), teacher, data


def _succeed(job_id: str, result: engine.EngineResult) -> str:
    storage = get_storage()
    rows = []
    for art in result.artifacts:  # blobs first, rows in the same transaction as the status change
        art_id = new_id("artifact")
        filename = Path(art.path).name
        blob = storage.put_file(f"artifacts/{job_id}/{art_id}/{filename}", Path(art.path))
        rows.append(Artifact(id=art_id, tenant_id="", job_id=job_id, kind=art.kind, format=art.format,
                             step_index=art.step_index, filename=filename, media_type=art.media_type,
                             size_bytes=blob.size_bytes, sha256=blob.sha256, storage_key=blob.key))
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        progress = dict(job.progress or {}, fraction=1.0, eta_seconds=0.0)
        try:
            state.transition(s, job_id, state.SUCCEEDED, metrics=_jsonable(result.metrics), progress=progress)
        except state.InvalidTransition:
            pass  # a cancel arrived during the final phase: honour it below, keep nothing
        else:
            for row in rows:
                row.tenant_id = job.tenant_id
                s.add(row)
            append_event(s, job_id, "succeeded", f"job succeeded with {len(rows)} artifacts",
                         data={"metrics": _jsonable(result.metrics)})
            return state.SUCCEEDED
    for row in rows:
        storage.delete(row.storage_key)
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
