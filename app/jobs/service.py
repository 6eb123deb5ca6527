"""Create, read, list and cancel jobs. Validation that needs no GPU happens here, before 202."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import idempotency
from app.catalog.service import get_dataset, get_model
from app.db.models import Artifact, Dataset, Job, JobEvent, JobInput, JobMetric, Model
from app.errors import Conflict, NotFound, Unprocessable
from app.ids import new_id
from app.jobs import search as job_search, state, tracking
from app.jobs.budget import check_job
from app.jobs.events import append_event
from app.jobs.views import queued_progress
from jobspec import Facts, JobSpec, UploadedStudent, conflicts
from jobspec.rules import with_task_defaults
from app.pagination import paginate
from app.queue import dispatch
from app.settings import Settings
from app.webhooks.outbox import job_changed


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    row = session.get(Job, job_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no job {job_id}")
    return row


def create_job(session: Session, settings: Settings, tenant_id: str, body: dict[str, Any],
               idempotency_key: str | None) -> tuple[Job, bool]:
    """Validate ``body`` into a spec, store the job ``queued`` and enqueue it after commit.

    Returns (job, created); created is False when an identical earlier request is replayed.
    """
    req = idempotency.request_hash(body)
    if (prior := idempotency.lookup(session, tenant_id, "jobs", idempotency_key, req)) is not None:
        return get_job(session, tenant_id, prior), False
    spec = JobSpec.model_validate(body)
    teacher = get_model(session, tenant_id, spec.teacher_model_id) if spec.teacher_model_id else None
    if spec.teacher is not None and not settings.teacher_endpoint_allowed(spec.teacher.endpoint.url):
        raise Unprocessable(f"teacher.endpoint.url: the host of {spec.teacher.endpoint.url!r} is not on this "
                            "deployment's allow-list (DISTILLERY_TEACHER_ENDPOINT_HOSTS)", code="endpoint_not_allowed")
    datasets = {ds_id: get_dataset(session, tenant_id, ds_id) for ds_id in spec.dataset_ids()}
    student_model = (get_model(session, tenant_id, spec.student.model_id)
                     if isinstance(spec.student, UploadedStudent) else None)
    spec = with_task_defaults(spec, teacher.task if teacher is not None else "causal_lm")
    check_compatible(spec, teacher, datasets, student_model)
    tracking.check_available(spec, settings)
    if spec.search is not None:  # its own defaults, checks and a budget over every trial (app/jobs/search.py)
        spec = job_search.prepare(spec, teacher, datasets, settings)
    else:
        # Parameters, memory and time from metadata alone: 422 budget_exceeded before 202 (docs/budgets.md).
        check_job(spec, teacher, datasets, student_model, settings)
    job_id = new_id("job")
    # The key is claimed before the job exists: of concurrent identical requests exactly one goes on.
    if (prior := idempotency.claim(session, tenant_id, "jobs", idempotency_key, req, job_id)) is not None:
        return get_job(session, tenant_id, prior), False
    job = Job(id=job_id, tenant_id=tenant_id, status=state.QUEUED, kind=spec.kind,
              teacher_model_id=teacher.id if teacher is not None else None, dataset_id=spec.dataset_id,
              spec=spec.model_dump(mode="json"),
              queue=settings.job_queue, attempts=0, max_attempts=settings.max_attempts,
              tracking=tracking.initial_state(spec),
              progress=queued_progress(spec))
    if spec.search is not None:  # no dispatch: the leader's coordinator runs it (worker/search.py)
        job.role, job.progress = job_search.SEARCH, job_search.initial_progress(spec.search)
    session.add(job)
    session.flush()
    for resource_id, role in _inputs(spec):
        session.add(JobInput(job_id=job.id, resource_id=resource_id, role=role))
    append_event(session, job.id, "queued", f"job queued on '{job.queue}'" if spec.search is None else
                 f"search of {spec.search.trials} trials queued; its trials run on '{job.queue}'")
    if spec.search is None:
        dispatch(session, job.id, job.queue)
    job_changed(session, job.id, state.QUEUED)  # a new job is queued without a transition: announce it here
    return job, True


def _inputs(spec: JobSpec) -> list[tuple[str, str]]:
    roles = {spec.teacher_model_id: "teacher"} if spec.teacher_model_id else {}
    if isinstance(spec.student, UploadedStudent):
        roles.setdefault(spec.student.model_id, "student")
    for ds_id in spec.dataset_ids():
        roles.setdefault(ds_id, "eval_dataset" if ds_id == spec.eval_dataset_id else "dataset")
    return list(roles.items())


def check_compatible(spec: JobSpec, teacher: Model | None, datasets: dict[str, Dataset],
                     student: Model | None = None) -> None:
    """The spec against the teacher's and datasets' recorded facts (:mod:`jobspec.rules`, the same rules the
    engine checks again at job start), before the job is queued."""
    tokenizers = {m.id: m.io_schema["hf"]["tokenizer_sha256"] for m in (teacher, student)
                  if m is not None and isinstance((m.io_schema or {}).get("hf"), dict)}
    facts = Facts(task=teacher.task if teacher else "causal_lm", teacher_format=teacher.format if teacher else "endpoint",
                  labelled={ds_id: ds.has_labels for ds_id, ds in datasets.items()}, tokenizers=tokenizers,
                  formats={ds_id: ds.format for ds_id, ds in datasets.items()},
                  model_formats={m.id: m.format for m in (teacher, student) if m is not None},
                  kinds={ds_id: (ds.schema_ or {}).get("records") for ds_id, ds in datasets.items()
                         if ds.format == "jsonl"})
    problem = next(conflicts(spec, facts), None)
    if problem is not None:
        raise Unprocessable(str(problem), code="incompatible_spec")


def list_jobs(session: Session, tenant_id: str, *, limit: int, after: str | None, status: str | None,
              kind: str | None, parent_id: str | None = None) -> tuple[list[Job], bool, str | None]:
    # A search's trials are listed under their parent (parent_id=…), not among the tenant's own jobs.
    stmt = select(Job).where(Job.tenant_id == tenant_id, Job.parent_id == parent_id if parent_id
                             else Job.parent_id.is_(None))
    if status:
        if status not in state.STATUSES:
            raise Unprocessable(f"status must be one of {', '.join(state.STATUSES)}", code="invalid_filter")
        stmt = stmt.where(Job.status == status)
    if kind:
        # kind matches a job containing that step kind ('distill' matches 'distill+quantize')
        stmt = stmt.where((Job.kind == kind) | Job.kind.like(f"{kind}+%") | Job.kind.like(f"%+{kind}")
                          | Job.kind.like(f"%+{kind}+%"))
    return paginate(session, stmt, Job, limit, after)


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """Ask a job to stop. Queued → cancelled at once; running → cancelling (the worker stops within a step).

    Idempotent: cancelling again answers the same; a finished job is a 409.
    """
    job = get_job(session, tenant_id, job_id)
    for _ in range(3):  # the worker may move the job between our read and our update: re-read and retry
        session.refresh(job)
        if job.status == state.CANCELLING or job.status == state.CANCELLED:
            return job
        if job.status in state.TERMINAL:
            raise Conflict(f"job {job_id} already {job.status}; there is nothing to cancel", code="job_finished")
        target = state.CANCELLED if job.status == state.QUEUED else state.CANCELLING
        ended = ({"error_code": "cancelled", "error_message": "cancelled by the client",
                  "tracking": tracking.never_ran(job.tracking)} if target == state.CANCELLED else {})
        try:
            state.transition(session, job_id, target, allowed_from={job.status}, **ended)
        except state.InvalidTransition:
            continue
        append_event(session, job_id, "cancel_requested", "cancel requested by the client")
        if job.role == job_search.SEARCH:  # its trials stop with it; the coordinator then ends the search
            job_search.cancel_trials(session, job_id)
        session.refresh(job)
        return job
    raise Conflict(f"job {job_id} changed state while cancelling; retry", code="job_busy")


def events_after(session: Session, job_id: str, after: int, limit: int = 1000) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after)
                                .order_by(JobEvent.seq).limit(limit)))


def metric_points(session: Session, job_id: str) -> list[JobMetric]:
    return list(session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.id)))


def job_artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)
                                .order_by(Artifact.created_at, Artifact.id)))


def get_artifact(session: Session, tenant_id: str, artifact_id: str) -> Artifact:
    row = session.get(Artifact, artifact_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no artifact {artifact_id}")
    return row
