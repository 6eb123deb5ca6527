"""Run one job: claim it, hand it to the engine, store what comes out, end it in a known state.

Idempotent by job id: the claim is a conditional ``queued → running`` update that writes a fresh lease token,
so a duplicate delivery (or a job cancelled before it started) does nothing. Every later write is fenced by
that token (:mod:`worker.attempt`): after a requeue, a stale attempt changes nothing in the database or the
artifacts. Each attempt works in its own directory and mirrors checkpoints to its own storage prefix;
checkpoints are deleted only after this attempt's own guarded terminal transition.

On worker shutdown (:data:`RELEASE`, set by SIGTERM) the attempt asks its executor to checkpoint, then puts
the job back in the queue without using up an attempt, for another worker to resume.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from app.db.models import Artifact, Dataset, Job, Model
from app.db.session import session_scope
from app.ids import new_id
from app.jobs import state
from app.jobs.events import append_event
from app.queue import dispatch
from app.settings import Settings, get_settings
from app.storage import Storage, StorageUnavailable, storage_for
import engine
from worker import checkpoints, supervisor
from worker.input_cache import CacheSession, CacheStats, InputCache, InputCorrupt
from worker.attempt import Attempt, Heartbeat, is_transient, new_token, retrying
from worker.reporter import DbReporter, _jsonable
from worker.tracking import Tracker, open_tracker

log = logging.getLogger("distillery.worker")
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
#: Set when the worker is asked to stop (SIGTERM, Ctrl-C): the running attempt releases its job.
RELEASE = threading.Event()


def run_job(job_id: str, settings: Settings | None = None) -> str:
    """Execute ``job_id`` if it is still queued. Returns the status the job ended in ('skipped' when this
    delivery did nothing, 'released' when it went back to the queue)."""
    settings = settings or get_settings()
    if RELEASE.is_set():
        return "skipped"  # shutting down: leave the job queued (its message is acked; the dispatcher re-sends)
    attempt = retrying(lambda: _claim(job_id, settings), budget_seconds=settings.db_retry_seconds,
                       what="claiming a job")
    if attempt is None:
        return "skipped"
    work = settings.data_dir / "work" / job_id / attempt.token
    storage = storage_for(settings)
    ended = "skipped"
    tracker = open_tracker(attempt, settings)  # its run opens in a thread of its own while the job starts
    try:
        with Heartbeat(attempt):
            ended = _execute(attempt, settings, storage, work, tracker)
        # After the job's own transition, before its work dir (the files the run gets) is removed.
        tracker.finish(ended)
        return ended
    finally:
        tracker.abandon()  # a no-op after finish; otherwise the run stays open for the next attempt
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(_snapshot_dir(work), ignore_errors=True)
        _rmdir_if_empty(work.parent)
        _drop_checkpoints(storage, attempt, ended)


def _snapshot_dir(work: Path) -> Path:
    """The supervisor's own copy of the executor's checkpoint dir, beside (never inside) its scratch."""
    return work.with_name(f".{work.name}.checkpoint")


def _drop_checkpoints(storage: Storage, attempt: Attempt, ended: str) -> None:
    # Checkpoints live in blob storage under the job id, one folder per attempt, so a retry on any worker resumes
    # where the newest attempt stopped and two attempts never write the same blobs (worker/checkpoints.py).
    try:
        if ended in state.TERMINAL:  # this attempt's guarded transition ended the job: no resume point needed
            checkpoints.delete_job(storage, attempt.job_id)
        elif attempt.lost.is_set() and _ended_elsewhere(attempt.job_id):
            # Fenced out, and another attempt has ended the job (and removed the checkpoints it knew of): what
            # this one wrote after that is nobody's resume point. While the job is still live it may be.
            storage.delete_folder(f"{checkpoints.job_folder(attempt.job_id)}/{attempt.token}")
    except Exception:  # the job has ended either way; the sweep (local) or a lifecycle rule (S3) takes the rest
        log.exception("could not delete the checkpoints of job %s", attempt.job_id)


def _ended_elsewhere(job_id: str) -> bool:
    try:
        with session_scope() as s:
            job = s.get(Job, job_id)
            return job is None or job.status in state.TERMINAL
    except Exception:  # the database is away: keep the files; the sweep removes them once the job has ended
        return False


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _execute(attempt: Attempt, settings: Settings, storage: Storage, work: Path, tracker: Tracker) -> str:
    """Run the engine for a claimed job in a sandboxed executor and end the job in a known state."""
    job_id = attempt.job_id
    reporter = DbReporter(attempt, on_metric=tracker.metric)
    cache = InputCache(settings.resolved_blob_cache_dir, settings.blob_cache_bytes,
                       stale_partial_seconds=settings.sweep_temp_age_seconds)
    try:
        spec, needed = retrying(lambda: _inputs(job_id), budget_seconds=settings.db_retry_seconds,
                                what="reading inputs")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        with cache.session() as inputs:  # the inputs stay pinned in the cache until the executor has ended
            files = _place(spec, needed, storage, inputs)
            if inputs.stats.downloaded or inputs.stats.cached:
                _report_fetch(reporter, storage, inputs.stats)
            ckpts = checkpoints.AttemptCheckpoints(storage, job_id, attempt.token, _snapshot_dir(work))
            ending = supervisor.supervise(files, work, ckpts, settings, reporter, reporter.should_stop,
                                          should_release=RELEASE.is_set,
                                          release_seconds=max(settings.shutdown_grace_seconds - 10.0, 1.0))
    except _MissingInput as exc:
        return _end(attempt, state.FAILED, "input_missing", str(exc))
    except Exception as exc:
        if attempt.lost.is_set():
            return "skipped"  # fenced out meanwhile: whatever failed, this attempt may write nothing
        if is_transient(exc) or isinstance(exc, StorageUnavailable):
            # The database (or the object store) stayed away past the retry budget: not the job's fault. Leave
            # it running; its lease expires, the reaper requeues it and the next attempt resumes from the
            # checkpoint.
            log.exception("job %s lost its database or storage connection; it will be retried", job_id)
            raise
        log.exception("job %s crashed", job_id)  # a bug or an environment failure: never leave the job running
        return _end(attempt, state.FAILED, "internal_error", f"{exc.__class__.__name__}: {exc}",
                    data={"traceback": traceback.format_exc()[-4000:]})
    if attempt.lost.is_set():
        return "skipped"
    if isinstance(ending, supervisor.Finished):
        tracker.keep(ending.artifacts)
    if isinstance(ending, supervisor.Released):
        return _release(attempt)
    if isinstance(ending, supervisor.Stopped):
        return _end(attempt, state.CANCELLED, "cancelled", "cancelled by the client")
    if isinstance(ending, supervisor.Failed):
        return _end(attempt, state.FAILED, ending.code, ending.message, data=ending.data or None)
    result = engine.EngineResult(artifacts=ending.artifacts, metrics=ending.metrics)
    if ending.status == "quality_gate":
        # Keep what the last step that met its budget produced, and the report that says which step broke it.
        return _fail_with_artifacts(attempt, storage, engine.QualityGateFailed(ending.message, result))
    return _succeed(attempt, storage, result)


class _MissingInput(Exception):
    pass


def _claim(job_id: str, settings: Settings) -> Attempt | None:
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; message dropped", job_id)
            return None
        if job.role == "search":  # the leader's coordinator runs a search (worker/search.py), never a worker
            log.warning("job %s is a search; its message is dropped (its trials are jobs of their own)", job_id)
            return None
        attempt = Attempt(job_id, new_token(), job.attempts + 1, WORKER_ID, settings.lease_seconds,
                          db_retry_seconds=settings.db_retry_seconds)
        try:
            state.transition(s, job_id, state.RUNNING, allowed_from={state.QUEUED}, attempts=Job.attempts + 1,
                             worker_id=WORKER_ID, lease_token=attempt.token, **attempt.lease_values())
        except state.InvalidTransition:
            log.info("job %s is %s, not queued; duplicate delivery ignored", job_id, job.status)
            return None
        append_event(s, job_id, "started", f"attempt {attempt.number} started on {WORKER_ID}",
                     data={"attempt": attempt.number, "worker": WORKER_ID, "device": settings.device})
    return attempt


def _release(attempt: Attempt) -> str:
    """Back to ``queued`` without using up an attempt, with a dispatch for the next worker (fenced)."""
    def once() -> str:
        attempt.finishing.set()
        with session_scope() as s:
            try:
                state.transition(s, attempt.job_id, state.QUEUED, allowed_from={state.RUNNING}, fence=attempt.token,
                                 attempts=Job.attempts - 1, worker_id=None)
            except state.InvalidTransition:
                return ""
            append_event(s, attempt.job_id, "released", f"attempt {attempt.number} released by {WORKER_ID} (worker "
                         "shutting down); the job resumes from its last checkpoint on the next worker",
                         level="warning")
            job = s.get(Job, attempt.job_id)
            dispatch(s, attempt.job_id, job.queue if job else "cpu", reason="released")
            return "released"
    if retrying(once, budget_seconds=attempt.db_retry_seconds, what="releasing a job"):
        log.info("job %s released for another worker", attempt.job_id)
        return "released"
    # Cancelled meanwhile (status cancelling): honour the cancel.
    return _end(attempt, state.CANCELLED, "cancelled", "cancelled by the client")


@dataclass(frozen=True)
class _Input:
    """A blob the job reads, and how to describe it to the engine once it is a local file."""

    what: str  # "teacher model mdl_x", for messages
    role: str  # teacher | dataset | model
    id: str
    key: str
    sha256: str
    source: Callable[[Path], Any]


def _inputs(job_id: str) -> tuple[dict, list[_Input]]:
    """The job's spec and every model and dataset it names, read in one short transaction (no download in it)."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        spec = dict(job.spec)
        needed = []
        if spec.get("teacher_model_id") is not None:  # else a served teacher (worker/teacher_proxy.py)
            model = s.get(Model, spec["teacher_model_id"])
            if model is None:
                raise _MissingInput(f"teacher model {spec['teacher_model_id']} was deleted before the job ran")
            needed.append(_Input(f"teacher model {model.id}", "teacher", model.id, model.storage_key, model.sha256,
                                 functools.partial(engine.TeacherSource, format=model.format, task=model.task,
                                                   sha256=model.sha256, architecture=model.architecture)))
        for ds_id in _dataset_ids(spec):
            ds = s.get(Dataset, ds_id)
            if ds is None:
                raise _MissingInput(f"dataset {ds_id} was deleted before the job ran")
            needed.append(_Input(f"dataset {ds.id}", "dataset", ds.id, ds.storage_key, ds.sha256, functools.partial(
                engine.DatasetSource, format=ds.format, sha256=ds.sha256,
                inputs=tuple(ds.schema_.get("inputs", ["x"])), options=dict(ds.schema_.get("options") or {}))))
        student_model = (spec.get("student") or {}).get("model_id")
        if student_model:
            m = s.get(Model, student_model)
            if m is None:
                raise _MissingInput(f"student model {student_model} was deleted before the job ran")
            needed.append(_Input(f"student model {m.id}", "model", m.id, m.storage_key, m.sha256, functools.partial(
                engine.ModelSource, format=m.format, architecture=m.architecture, sha256=m.sha256)))
        return spec, needed


def _place(spec: dict, needed: list[_Input], storage: Storage, inputs: CacheSession) -> supervisor.JobFiles:
    """Each input as a local file: in place on local storage, else downloaded (verified) into the input cache."""
    placed: dict[str, dict[str, Any]] = {"teacher": {}, "dataset": {}, "model": {}}
    for item in needed:
        try:
            path = inputs.path(storage, item.key, item.sha256)
        except FileNotFoundError as exc:
            raise _MissingInput(f"the stored file of {item.what} is missing from {storage.url}") from exc
        except InputCorrupt as exc:
            raise _MissingInput(f"the stored file of {item.what} is damaged: {exc}") from exc
        placed[item.role][item.id] = item.source(path=path)
    teacher = next(iter(placed["teacher"].values()), None)
    if teacher is None:  # the supervisor stages the served teacher's description in the job's scratch directory
        teacher = engine.TeacherSource(path=Path("endpoint.json"), format="endpoint", task="causal_lm")
    return supervisor.JobFiles(spec, teacher, placed["dataset"], placed["model"])


def _report_fetch(reporter: DbReporter, storage: Storage, stats: CacheStats) -> None:
    reporter.event("inputs_fetched", f"{stats.downloaded} input(s) downloaded from {storage.url} "
                   f"({stats.downloaded_bytes} bytes, {stats.seconds:.1f} s), {stats.cached} found in the "
                   "worker's input cache", level="info",
                   data={"downloaded": stats.downloaded, "downloaded_bytes": stats.downloaded_bytes,
                         "cached": stats.cached, "seconds": round(stats.seconds, 3)})


def _dataset_ids(spec: dict) -> list[str]:
    ids = [spec.get("dataset_id"), spec.get("eval_dataset_id")] + [st.get("dataset_id") for st in spec["steps"]]
    return list(dict.fromkeys(i for i in ids if i))


def _store_blobs(storage: Storage, job_id: str, artifacts: list[engine.ArtifactFile]) -> list[Artifact]:
    """Write every artifact's blob (first) and return the rows to insert with the status change."""
    rows = []
    for art in artifacts:
        art_id = new_id("artifact")
        filename = Path(art.path).name
        blob = storage.put_file(f"artifacts/{job_id}/{art_id}/{filename}", Path(art.path))
        rows.append(Artifact(id=art_id, tenant_id="", job_id=job_id, kind=art.kind, format=art.format,
                             step_index=art.step_index, filename=filename, media_type=art.media_type,
                             size_bytes=blob.size_bytes, sha256=blob.sha256, storage_key=blob.key))
    return rows


def _finish_with_artifacts(attempt: Attempt, storage: Storage, result: engine.EngineResult, to: str, message: str, *,
                           level: str,
                           event_data: dict, **values) -> bool:
    """Move the job to ``to`` and attach ``result``'s artifacts in the same transaction (blobs written first).

    Returns False, keeping nothing, when the job had already moved on (a cancel arrived, or the reaper took it).
    """
    job_id = attempt.job_id
    rows = _store_blobs(storage, job_id, result.artifacts)
    try:
        return retrying(lambda: _commit_finish(attempt, rows, result, to, message, level, event_data, values),
                        budget_seconds=attempt.db_retry_seconds, what="storing the result")
    finally:
        if not any(r.tenant_id for r in rows):  # not attached (moved on, fenced out, or the database stayed away)
            for row in rows:
                storage.delete(row.storage_key)


def _commit_finish(attempt: Attempt, rows: list[Artifact], result: engine.EngineResult, to: str, message: str,
                   level: str, event_data: dict, values: dict) -> bool:
    job_id = attempt.job_id
    attempt.finishing.set()
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        if to == state.SUCCEEDED:
            values["progress"] = dict(job.progress or {}, fraction=1.0, eta_seconds=0.0)
        # The artifact rows go in before the transition, so the webhook event it writes lists them.
        for row in rows:
            s.add(Artifact(**{c: getattr(row, c) for c in _ARTIFACT_COLUMNS}, tenant_id=job.tenant_id))
        try:
            # The state table narrows this further (only a running job can succeed).
            state.transition(s, job_id, to, allowed_from={state.RUNNING, state.CANCELLING}, fence=attempt.token,
                             metrics=_jsonable(result.metrics), **values)
        except state.InvalidTransition:
            s.rollback()  # the job moved on: none of those rows may stay
            return False
        append_event(s, job_id, to, message, level=level, data=event_data)
    for row in rows:
        row.tenant_id = job.tenant_id  # committed: the blobs are referenced now
    return True


_ARTIFACT_COLUMNS = ("id", "job_id", "kind", "format", "step_index", "filename", "media_type", "size_bytes", "sha256",
                     "storage_key")


def _fail_with_artifacts(attempt: Attempt, storage: Storage, exc: engine.EngineError) -> str:
    """Fail the job with ``exc``'s code but keep the artifacts its ``result`` carries (quality gate)."""
    kept = len(exc.result.artifacts)
    if _finish_with_artifacts(attempt, storage, exc.result, state.FAILED, exc.message, level="error",
                              event_data={"code": exc.code, "kept_artifacts": kept},
                              error_code=exc.code, error_message=exc.message):
        return state.FAILED
    return "skipped"  # cancelled or reaped meanwhile


def _succeed(attempt: Attempt, storage: Storage, result: engine.EngineResult) -> str:
    if _finish_with_artifacts(attempt, storage, result, state.SUCCEEDED,
                              f"job succeeded with {len(result.artifacts)} artifacts", level="info",
                              event_data={"metrics": _jsonable(result.metrics)}):
        return state.SUCCEEDED
    # A cancel arrived during the final phase: honour it, keep nothing.
    return _end(attempt, state.CANCELLED, "cancelled", "cancelled by the client")


def _end(attempt: Attempt, to: str, code: str, message: str, data: dict | None = None) -> str:
    """The attempt's guarded terminal transition (fenced by its token); 'skipped' when it no longer owns the job."""
    def once() -> str:
        attempt.finishing.set()
        with session_scope() as s:
            try:
                state.transition(s, attempt.job_id, to, allowed_from={state.RUNNING, state.CANCELLING},
                                 fence=attempt.token, error_code=code, error_message=message)
            except state.InvalidTransition:
                log.warning("job %s could not move to %s (moved on, or this attempt was fenced out)",
                            attempt.job_id, to)
                return "skipped"
            append_event(s, attempt.job_id, to, message, level="info" if to == state.CANCELLED else "error",
                         data={"code": code, **(data or {})})
        return to
    if attempt.lost.is_set():
        return "skipped"
    return retrying(once, budget_seconds=attempt.db_retry_seconds, what="ending a job")
