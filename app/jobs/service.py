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
from app.jobs import state
from app.jobs.budget import check_job
from app.jobs.events import append_event
from app.jobs.spec import JobSpec, UploadedStudent
from app.pagination import paginate
from app.queue import dispatch
from app.settings import Settings


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
    teacher = get_model(session, tenant_id, spec.teacher_model_id)
    datasets = {ds_id: get_dataset(session, tenant_id, ds_id) for ds_id in spec.dataset_ids()}
    student_model = (get_model(session, tenant_id, spec.student.model_id)
                     if isinstance(spec.student, UploadedStudent) else None)
    check_compatible(spec, teacher, datasets)
    # Parameters, memory and time from metadata alone: 422 budget_exceeded before 202 (docs/budgets.md).
    check_job(spec, teacher, datasets, student_model, settings)
    job_id = new_id("job")
    # The key is claimed before the job exists: of concurrent identical requests exactly one goes on.
    if (prior := idempotency.claim(session, tenant_id, "jobs", idempotency_key, req, job_id)) is not None:
        return get_job(session, tenant_id, prior), False
    job = Job(id=job_id, tenant_id=tenant_id, status=state.QUEUED, kind=spec.kind,
              teacher_model_id=teacher.id, dataset_id=spec.dataset_id, spec=spec.model_dump(mode="json"),
              queue=settings.job_queue, attempts=0, max_attempts=settings.max_attempts,
              progress={"step_index": 0, "step_kind": spec.steps[0].kind, "epoch": 0,
                        "epochs": getattr(spec.steps[0], "epochs", None), "fraction": 0.0, "eta_seconds": None})
    session.add(job)
    session.flush()
    for resource_id, role in _inputs(spec):
        session.add(JobInput(job_id=job.id, resource_id=resource_id, role=role))
    append_event(session, job.id, "queued", f"job queued on '{job.queue}'")
    dispatch(session, job.id, job.queue)
    return job, True


def _inputs(spec: JobSpec) -> list[tuple[str, str]]:
    roles = {spec.teacher_model_id: "teacher"}
    if isinstance(spec.student, UploadedStudent):
        roles.setdefault(spec.student.model_id, "student")
    for ds_id in spec.dataset_ids():
        roles.setdefault(ds_id, "eval_dataset" if ds_id == spec.eval_dataset_id else "dataset")
    return list(roles.items())


# Which teacher tasks each loss applies to; the engine's loss classes declare the same
# (tests/worker/test_component_contract.py keeps them equal).
LOSS_TASKS = {"kd": {"classification"}, "soft_ce": {"classification"}, "hard": {"classification"},
              "mse": {"classification", "regression", "embedding"}, "cosine": {"embedding"}}


GATE_METRICS = {"classification": {"accuracy", "agreement", "f1_macro"}, "regression": {"r2"},
                "embedding": {"cosine"}}
TORCH_ONLY_QUANTIZERS = {"dynamic_int8", "static_int8", "fp16", "bf16", "qat"}


def check_compatible(spec: JobSpec, teacher: Model, datasets: dict[str, Dataset]) -> None:
    """Step combinations that can be judged from metadata alone, before the job is queued."""
    for i, step in enumerate(spec.steps):
        finetune = getattr(step, "finetune", None)
        loss = getattr(step, "loss", None) or (finetune.loss if finetune is not None else None)
        gate = getattr(step, "gate", None)
        if gate is not None and gate.metric not in GATE_METRICS[teacher.task]:
            raise Unprocessable(f"steps[{i}].gate.metric '{gate.metric}' is not measured for a {teacher.task} "
                                f"teacher; use one of: {', '.join(sorted(GATE_METRICS[teacher.task]))}",
                                code="incompatible_spec")
        if spec.student is None and teacher.format == "onnx" and (
                step.kind == "prune" or (step.kind == "quantize" and step.method in TORCH_ONLY_QUANTIZERS)):
            raise Unprocessable(f"steps[{i}] ({step.kind} {step.method}) edits a torch model, but the teacher is "
                                f"ONNX and no student is given: quantize it with 'onnx_int8', or distill into a "
                                f"student first", code="incompatible_spec")
        if loss is not None and teacher.task not in LOSS_TASKS[loss.type]:
            allowed = sorted(name for name, tasks in LOSS_TASKS.items() if teacher.task in tasks)
            raise Unprocessable(f"steps[{i}].loss '{loss.type}' does not apply to a {teacher.task} teacher; "
                                f"use one of: {', '.join(allowed)}", code="incompatible_spec")
        if getattr(step, "synthesize", None) is not None and teacher.format == "onnx":
            raise Unprocessable(f"steps[{i}].synthesize trains a generator through the teacher, which needs a torch "
                                f"teacher (torchscript, torch_export or safetensors), not onnx",
                                code="incompatible_spec")
    if spec.baseline:
        if teacher.task == "embedding":
            raise Unprocessable("baseline needs labels to train on; embedding teachers have none",
                                code="incompatible_spec")
        for i, step in enumerate(spec.steps):
            ds_id = getattr(step, "dataset_id", None) or spec.dataset_id
            if ds_id is None or not datasets[ds_id].has_labels:
                raise Unprocessable(f"baseline trains the student on labels alone, but steps[{i}] reads "
                                    f"{'synthetic data' if ds_id is None else 'dataset ' + ds_id}, which has none",
                                    code="incompatible_spec")


def list_jobs(session: Session, tenant_id: str, *, limit: int, after: str | None, status: str | None,
              kind: str | None) -> tuple[list[Job], bool, str | None]:
    stmt = select(Job).where(Job.tenant_id == tenant_id)
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
        try:
            state.transition(session, job_id, target, allowed_from={job.status},
                             **({"error_code": "cancelled", "error_message": "cancelled by the client"}
                                if target == state.CANCELLED else {}))
        except state.InvalidTransition:
            continue
        append_event(session, job_id, "cancel_requested", "cancel requested by the client")
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
