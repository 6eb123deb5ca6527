"""Student search on the job domain's side: checks before 202, trial rows, the cascade of a cancel.

A search job (``jobs.role = "search"``) is never claimed by a worker: the leader's coordinator
(:mod:`worker.search`) moves it to ``running``, creates its trials and ends it. A trial is an ordinary job row
(``role = "trial"``, ``parent_id``, ``trial_number``) with the parent's spec, the sampled student and
hyper-parameters (:func:`jobspec.search.trial_spec`), so the whole job machinery runs it: the outbox, the fenced
claim, the sandboxed executor, metrics, artifacts, cancellation, requeue after a lost worker.

Before 202 (:func:`prepare`): the search's metric and default space are filled in from the teacher's task and the
dataset's inputs, every family is checked against those inputs, and the budget covers every trial: the largest
trial (the high end of every range) must fit the per-job parameter and memory limits, and ``trials`` of it the
compute limit (``DISTILLERY_MAX_JOB_SECONDS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Dataset, Job, JobInput, Model
from app.errors import Unprocessable
from app.ids import new_id
from app.jobs import budget, state
from app.jobs.events import append_event
from app.jobs.views import queued_progress
from app.queue import dispatch
from app.settings import Settings
from app.webhooks.outbox import job_changed
from jobspec import JobSpec
from jobspec.rules import GATE_METRIC_TASKS, LABELLED_GATE_METRICS
from jobspec.search import SearchConfig, SearchSpace, trial_spec

SEARCH, TRIAL = "search", "trial"
#: Search is offered for fixed-shape teachers (a causal LM's students are sized otherwise, docs/llm.md).
SEARCH_TASKS = frozenset({"classification", "regression", "embedding"})
_IMAGE_FAMILIES = frozenset({"cnn", "resnet"})
_TOKEN_FAMILIES = frozenset({"embedding_bag", "text_transformer"})
_DEFAULT_LR = (1e-3, 3e-2)


def _metric(spec: JobSpec, task: str, labelled: bool) -> str:
    """The search's metric: as given, else the task's natural one (checked against the task and the labels)."""
    metric = spec.search.metric
    if metric is None:
        metric = {"regression": "r2", "embedding": "cosine"}.get(task, "accuracy" if labelled else "agreement")
    if task not in GATE_METRIC_TASKS[metric]:
        allowed = ", ".join(m for m in ("accuracy", "agreement", "f1_macro", "r2", "cosine")
                            if task in GATE_METRIC_TASKS[m])
        raise Unprocessable(f"search.metric: '{metric}' is not measured for a {task} teacher; use one of: {allowed}",
                            code="incompatible_spec")
    if metric in LABELLED_GATE_METRICS and not labelled:
        raise Unprocessable(f"search.metric: '{metric}' is scored against labels, but the held-out data has none"
                            + (" (use 'agreement')" if task == "classification" else ""), code="incompatible_spec")
    return metric


def _input_kind(ds: Dataset | None) -> str | None:
    """``tokens`` (integer ids), ``image`` (rows of 2 or 3 dimensions), ``features`` (flat rows), or None when
    the dataset's schema does not say."""
    data = budget._data(ds) if ds is not None else None
    if data is None:
        return None
    first = data.inputs[0]
    if budget._is_int(data.arrays[first][1]) or first == "input_ids":
        return "tokens"
    return "image" if len(data.shapes[first]) in (2, 3) else "features"


def _default_space(kind: str | None) -> SearchSpace:
    families: dict[str, Any] = {"mlp": {}}
    if kind == "tokens":
        families = {"embedding_bag": {}}
    elif kind == "image":
        families = {"cnn": {}, "mlp": {}}
    return SearchSpace.model_validate({**families, "lr": list(_DEFAULT_LR)})


def _check_space(space: SearchSpace, kind: str | None, spec: JobSpec) -> None:
    for family in space.families():
        where = f"search.space.{family}"
        if family in _IMAGE_FAMILIES and kind in ("features", "tokens"):
            raise Unprocessable(f"{where}: {family} students take image rows (C×H×W or H×W); this dataset's rows "
                                f"are {kind}", code="incompatible_spec")
        if family in _TOKEN_FAMILIES and kind in ("features", "image"):
            raise Unprocessable(f"{where}: {family} students take token ids; this dataset's rows are float "
                                f"{kind}", code="incompatible_spec")
        if family not in _TOKEN_FAMILIES and family != "derive" and kind == "tokens":
            raise Unprocessable(f"{where}: {family} students take float rows; this dataset holds token ids "
                                "(use embedding_bag or text_transformer)", code="incompatible_spec")
    losses = [s.loss.type for s in spec.steps if s.kind == "distill"]
    if space.alpha is not None and "kd" not in losses:
        raise Unprocessable("search.space.alpha: only a 'kd' loss has alpha; no distill step uses one",
                            code="incompatible_spec")
    if space.temperature is not None and not {"kd", "soft_ce"} & set(losses):
        raise Unprocessable("search.space.temperature: only 'kd' and 'soft_ce' losses have a temperature; no "
                            "distill step uses one", code="incompatible_spec")


def prepare(spec: JobSpec, teacher: Model, datasets: Mapping[str, Dataset], settings: Settings) -> JobSpec:
    """The search job's spec as stored: metric and space filled in, checked against the task and the inputs, and
    its budget checked over every trial. Raises :class:`Unprocessable` (422) naming the field."""
    task = teacher.task
    if task not in SEARCH_TASKS:
        raise Unprocessable(f"search: not available for a {task} teacher (only for "
                            f"{', '.join(sorted(SEARCH_TASKS))})", code="unsupported")
    heldout = datasets.get(spec.heldout_dataset_id() or "")
    metric = _metric(spec, task, bool(heldout is not None and heldout.has_labels))
    kind = _input_kind(datasets.get(spec.dataset_id or ""))
    space = spec.search.space or _default_space(kind)
    _check_space(space, kind, spec)
    search = spec.search.model_copy(update={"metric": metric, "space": space})
    spec = spec.model_copy(update={"search": SearchConfig.model_validate(search.model_dump())})
    check_budget(spec, teacher, datasets, settings)
    return spec


def check_budget(spec: JobSpec, teacher: Model, datasets: Mapping[str, Dataset], settings: Settings) -> None:
    """Every trial within the per-job parameter and memory limits (the largest one, each family at the high end of
    its ranges, is sized) and all ``trials`` of the largest within the compute limit; else 422 budget_exceeded."""
    parent = spec.model_dump(mode="json")
    search = spec.search
    worst: budget.Estimate | None = None
    for corner in search.space.corners():
        trial = JobSpec.model_validate(trial_spec(parent, corner))
        est = budget.estimate(trial, teacher, datasets, settings=settings)
        loc = ("body", "search", "space", corner["family"])
        est = replace(est, largest_loc=loc if est.largest_loc[:2] == ("body", "student") else est.largest_loc,
                      largest=f"{est.largest} (the largest {corner['family']} trial)")
        if worst is None or (est.parameters, est.memory_bytes, est.flops) > (worst.parameters, worst.memory_bytes,
                                                                              worst.flops):
            worst = est
    assert worst is not None
    total = replace(worst, flops=worst.flops * search.trials, seconds=worst.seconds * search.trials,
                    assumptions=worst.assumptions + (f"{search.trials} trials, each sized as the largest",))
    budget.check(total, settings)


def initial_progress(search: SearchConfig) -> dict[str, Any]:
    return {"trials_done": 0, "trials": search.trials, "trials_running": 0, "trials_queued": 0, "fraction": 0.0,
            "eta_seconds": None}


def create_trial(session: Session, parent: Job, number: int, params: Mapping[str, Any]) -> Job:
    """Insert trial ``number`` of ``parent`` (queued, with its dispatch and inputs), in the caller's transaction.

    ``params``: the sampled values (``family``, ``<family>.<arg>``, ``temperature`` / ``alpha`` / ``lr``)."""
    spec = JobSpec.model_validate(trial_spec(parent.spec, params))
    job = Job(id=new_id("job"), tenant_id=parent.tenant_id, status=state.QUEUED, kind=spec.kind,
              teacher_model_id=parent.teacher_model_id, dataset_id=parent.dataset_id,
              spec=spec.model_dump(mode="json"), queue=parent.queue, attempts=0, max_attempts=parent.max_attempts,
              role=TRIAL, parent_id=parent.id, trial_number=number, trial={"number": number, "params": dict(params)},
              progress=queued_progress(spec))
    session.add(job)
    session.flush()
    for row in session.scalars(select(JobInput).where(JobInput.job_id == parent.id)):
        session.add(JobInput(job_id=job.id, resource_id=row.resource_id, role=row.role))
    append_event(session, job.id, "queued", f"trial {number} of search {parent.id} queued on '{job.queue}'",
                 data={"parent_id": parent.id, "trial": number, "params": dict(params)})
    dispatch(session, job.id, job.queue)
    job_changed(session, job.id, state.QUEUED)
    return job


def active_trials(session: Session, parent_id: str) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.parent_id == parent_id, Job.status.in_(sorted(state.ACTIVE)))
                                .order_by(Job.trial_number)))


def cancel_trials(session: Session, parent_id: str, *, reason: str = "the search was cancelled") -> int:
    """Cancel every unfinished trial of ``parent_id`` (queued → cancelled, running → cancelling: its worker stops it
    within a second), in the caller's transaction; returns how many were asked to stop."""
    asked = 0
    for trial in active_trials(session, parent_id):
        if cancel_one(session, trial, reason):
            asked += 1
    return asked


def cancel_one(session: Session, job: Job, reason: str, *, code: str = "cancelled") -> bool:
    """One guarded cancel of ``job`` (False when it moved on meanwhile: it ended, or is already stopping)."""
    target = state.CANCELLED if job.status == state.QUEUED else state.CANCELLING
    if job.status not in (state.QUEUED, state.RUNNING):
        return False
    ended = {"error_code": code, "error_message": reason} if target == state.CANCELLED else {}
    try:
        state.transition(session, job.id, target, allowed_from={job.status}, **ended)
    except state.InvalidTransition:
        return False
    append_event(session, job.id, "cancel_requested", reason)
    return True
