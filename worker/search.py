"""The search coordinator: advances every student search from the leader, one short pass a second.

A search job (``jobs.role = "search"``, :mod:`app.jobs.search`) holds no worker slot: its trials are ordinary jobs
that any free worker claims, so one worker runs them in turn and several run them side by side. Each pass, for
each unfinished search:

1. **Results.** A trial that ended gets its result in ``jobs.trial``: from its report artifact (parameters, CPU
   latency at batch 1, the teacher's and the student's held-out ``metric``, the drop) and its per-epoch curve of
   ``val_<metric>``; or its error, or that it was pruned or cancelled.
2. **Study.** An Optuna study is rebuilt from the trial rows alone (``optuna.trial.create_trial`` +
   ``study.add_trial``; no Optuna tables): finished trials COMPLETE with their objective (log10 parameters,
   latency, or the metric) and a constraint (the drop over ``max_drop``, the budgets of ``best``), pruned ones
   PRUNED, failed ones FAIL, unfinished ones RUNNING. Its TPE sampler is seeded with the job's seed plus the
   number of trials so far, so the same rows always give the same next trial, on any leader.
3. **Prune.** A running trial whose best ``val_<metric>`` so far is below the median of the finished trials' at
   its latest epoch is cancelled like a job (Optuna's ``MedianPruner`` decides, on a second study of the curves).
4. **Ask.** While fewer than ``trials`` have started, a new trial is queued whenever none is waiting in the queue
   (so every free worker finds one, and each new one is sampled knowing as many results as possible), or, with
   ``parallel``, while fewer than that many are in flight.
5. **End.** Once every trial has ended the winner is chosen (:func:`choose`) and the search ends through the one
   guarded transition: ``succeeded`` with the winner's student files (the same blobs), a report (the winner's,
   plus ``search``: the trials table) and a Pareto plot; or ``failed`` (``search_no_feasible_trial``, naming the
   best trial found, with the report and plot; ``search_trials_failed`` when trials keep failing).

A cancelled search (``cancelling``) cancels its unfinished trials and ends ``cancelled`` once they have stopped.
Each pass over a search holds its row's lock (``SELECT … FOR UPDATE``) while it decides, so a leader that lost
its lease mid-pass and its successor never both add the same trial (``uq_jobs_parent_id`` would refuse it too).

References: J. Bergstra, R. Bardenet, Y. Bengio, B. Kégl, "Algorithms for Hyper-Parameter Optimization",
NeurIPS 2011 (TPE); T. Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization Framework", KDD 2019
(median pruning); S. Watanabe, F. Hutter, "c-TPE: Tree-structured Parzen Estimator with Inequality Constraints",
IJCAI 2023 (constraints in TPE).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import tempfile
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from app.db.models import Artifact, Dataset, Job, JobMetric, Model
from app.db.session import session_scope
from app.ids import new_id
from app.jobs import budget, state
from app.jobs import search as jobs_search
from app.jobs.events import append_event
from app.settings import Settings
from app.storage import Storage, storage_for
from jobspec import JobSpec
from jobspec.search import SearchConfig, describe_student, student_config

log = logging.getLogger("distillery.search")
#: Trials that failed in a row, none succeeded yet: the search itself is failing (a broken spec, missing input).
FAIL_FAST_AFTER = 3
#: Largest report a trial may hand the coordinator (it is JSON written by the sandboxed engine).
MAX_REPORT_BYTES = 16 * 1024 * 1024
_ENDED = frozenset({state.SUCCEEDED, state.FAILED, state.CANCELLED})
_IN_FLIGHT = frozenset({state.QUEUED, state.RUNNING, state.CANCELLING})


class Coordinator:
    """``run()`` loops until ``stop`` is set, advancing every search while ``leader`` holds the lease."""

    def __init__(self, settings: Settings, leader: Any, stop: threading.Event, interval: float):
        self.settings, self.leader, self.stop, self.interval = settings, leader, stop, interval

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                if self.leader.held():
                    advance_all(self.settings)
            except Exception:
                log.exception("search pass failed; trying again")


def advance_all(settings: Settings, storage: Storage | None = None) -> int:
    """One pass over every unfinished search; returns how many were looked at."""
    storage = storage or storage_for(settings)
    with session_scope() as s:
        ids = list(s.scalars(select(Job.id).where(Job.role == jobs_search.SEARCH,
                                                  Job.status.in_(sorted(state.ACTIVE))).order_by(Job.created_at)))
    for job_id in ids:
        try:
            advance(job_id, storage)
        except Exception:  # one broken search must not stall the others
            log.exception("search %s: pass failed", job_id)
    return len(ids)


# ---- one pass ------------------------------------------------------------------------------------------------


def advance(job_id: str, storage: Storage) -> str:
    """Advance search ``job_id`` by one pass; returns its status afterwards."""
    _record_results(job_id, storage)
    with session_scope() as s:
        parent = s.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()
        if parent is None or parent.status in state.TERMINAL:
            return parent.status if parent is not None else "gone"
        search = JobSpec.model_validate(parent.spec).search
        assert search is not None
        if parent.status == state.QUEUED:
            state.transition(s, job_id, state.RUNNING, allowed_from={state.QUEUED}, attempts=1)
            append_event(s, job_id, "started", f"search started: up to {search.trials} trials, objective "
                         f"{search.objective} on {search.metric}", data={"trials": search.trials})
        elif parent.status == state.CANCELLING:
            return _wind_down(s, parent)
        trials = list(s.scalars(select(Job).where(Job.parent_id == job_id).order_by(Job.trial_number)))
        if search.pruning.enabled:
            _prune(s, search, trials)
        failing = _failing(trials)
        if failing is None:
            _ask(s, parent, search, trials)
        trials = list(s.scalars(select(Job).where(Job.parent_id == job_id).order_by(Job.trial_number)))
        _update_progress(s, parent, search, trials)
        if failing is not None:
            if any(t.status in _IN_FLIGHT for t in trials):
                jobs_search.cancel_trials(s, job_id, reason="the search is failing: its trials keep failing")
                return state.RUNNING
            return _end_failed(s, parent, storage, search, trials, "search_trials_failed", failing)
        if len(trials) >= search.trials and all(t.status in _ENDED and (t.trial or {}).get("outcome")
                                                for t in trials):
            return _finish(s, parent, storage, search, trials)
        return state.RUNNING


def _wind_down(s: Any, parent: Job) -> str:
    """A cancelled search: stop what still runs; once nothing does, end it ``cancelled``."""
    jobs_search.cancel_trials(s, parent.id)
    if jobs_search.active_trials(s, parent.id):
        return state.CANCELLING
    state.transition(s, parent.id, state.CANCELLED, allowed_from={state.CANCELLING}, error_code="cancelled",
                     error_message="cancelled by the client")
    append_event(s, parent.id, state.CANCELLED, "search cancelled; its trials have stopped")
    return state.CANCELLED


def _failing(trials: list[Job]) -> str | None:
    """The error that ends a search whose trials keep failing: ``FAIL_FAST_AFTER`` failed, none succeeded."""
    if any(t.status == state.SUCCEEDED for t in trials):
        return None
    failed = [t for t in trials if t.status == state.FAILED]
    if len(failed) < FAIL_FAST_AFTER:
        return None
    first = failed[0]
    return (f"{len(failed)} trials failed and none succeeded; trial {first.trial_number} failed with "
            f"{first.error_code}: {first.error_message}")


# ---- results ---------------------------------------------------------------------------------------------------


def _record_results(job_id: str, storage: Storage) -> None:
    """Give every ended trial of ``job_id`` its ``outcome`` (and result) once, outside the search's lock."""
    with session_scope() as s:
        parent = s.get(Job, job_id)
        if parent is None:
            return
        metric = (parent.spec.get("search") or {}).get("metric") or "accuracy"
        ended = [t for t in s.scalars(select(Job).where(Job.parent_id == job_id, Job.status.in_(sorted(_ENDED))))
                 if not (t.trial or {}).get("outcome")]
        for t in ended:
            info = dict(t.trial or {})
            info["curve"] = _curve(s, t.id, metric)
            info["worker"] = t.worker_id
            if t.status == state.SUCCEEDED:
                try:
                    info["result"] = _result(storage, s, t, metric)
                    info["outcome"] = "succeeded"
                except Exception as exc:  # noqa: BLE001 - a trial whose report is unreadable counts as failed
                    info["outcome"], info["error"] = "failed", {"code": "report_unreadable", "message": str(exc)}
            elif t.status == state.FAILED:
                info["outcome"], info["error"] = "failed", {"code": t.error_code, "message": t.error_message}
            else:
                info["outcome"] = "pruned" if info.get("pruned") else "cancelled"
            s.execute(update(Job).where(Job.id == t.id).values(trial=info).execution_options(synchronize_session=False))


def _curve(s: Any, job_id: str, metric: str) -> dict[str, float]:
    """``{epoch: val_<metric>}`` of a trial (JSON keys are strings)."""
    rows = s.execute(select(JobMetric.epoch, JobMetric.value).where(JobMetric.job_id == job_id,
                                                                      JobMetric.name == f"val_{metric}")
                     .order_by(JobMetric.id)).all()
    return {str(int(r.epoch)): float(r.value) for r in rows if math.isfinite(r.value)}


def _result(storage: Storage, s: Any, trial: Job, metric: str) -> dict[str, Any]:
    """The numbers the search compares, from the trial's report artifact."""
    art = s.scalars(select(Artifact).where(Artifact.job_id == trial.id, Artifact.kind == "report",
                                           Artifact.format == "json")).first()
    if art is None:
        raise ValueError("the trial has no report")
    if art.size_bytes > MAX_REPORT_BYTES:
        raise ValueError(f"the trial's report is {art.size_bytes} bytes (at most {MAX_REPORT_BYTES})")
    with storage.open(art.storage_key) as f:
        report = json.loads(f.read(MAX_REPORT_BYTES + 1))
    teacher, student = report["teacher"], report["student"]
    value, reference = float(student[metric]), float(teacher[metric])
    latency = float(student["latency_ms"]["batch_1"])
    # the report comes out of the sandbox: a NaN would slip through every comparison the ranking makes
    if not all(math.isfinite(x) for x in (value, reference, latency)):
        raise ValueError(f"the trial's report holds a non-finite {metric} or latency")
    return {"num_parameters": int(student["num_parameters"]), "size_bytes": int(student.get("size_bytes") or 0),
            "latency_ms": latency, "metric": value, "teacher_metric": reference,
            "drop": reference - value, "report_artifact_id": art.id}


# ---- the study ---------------------------------------------------------------------------------------------------


def _distributions(search: SearchConfig) -> dict[str, Any]:
    import optuna.distributions as d

    out: dict[str, Any] = {}
    for dim in search.space.dimensions():
        if dim.kind == "choice":
            out[dim.name] = d.CategoricalDistribution(list(dim.choices))
        elif dim.kind == "int":
            out[dim.name] = d.IntDistribution(int(dim.low), int(dim.high), log=dim.log, step=dim.step or 1)
        else:
            out[dim.name] = d.FloatDistribution(float(dim.low), float(dim.high), log=dim.log)
    return out


def objective_value(search: SearchConfig, result: Mapping[str, Any]) -> float:
    """What TPE minimises (smallest, fastest) or maximises (best)."""
    if search.objective == "smallest":
        return math.log10(max(1, result["num_parameters"]))
    if search.objective == "fastest":
        return float(result["latency_ms"])
    return float(result["metric"])


def constraints(search: SearchConfig, result: Mapping[str, Any]) -> dict[str, float]:
    """Each target as ``value − limit`` (≤ 0: met), the form Optuna's constrained TPE reads."""
    out: dict[str, float] = {}
    if (limit := search.drop_limit()) is not None:
        out["drop"] = float(result["drop"]) - limit
    if search.max_parameters is not None and "num_parameters" in result:
        out["parameters"] = (result["num_parameters"] - search.max_parameters) / search.max_parameters
    if search.max_latency_ms is not None and "latency_ms" in result:
        out["latency"] = float(result["latency_ms"]) - search.max_latency_ms
    return out


def _frozen(search: SearchConfig, t: Job, dists: dict[str, Any], metric_view: bool) -> Any | None:
    """Trial row ``t`` as an Optuna FrozenTrial: of the sampling study, or (``metric_view``) of the pruning study
    whose values are the held-out metric."""
    from optuna.trial import TrialState, create_trial

    info = t.trial or {}
    params = {k: v for k, v in (info.get("params") or {}).items() if k in dists}
    used = {k: dists[k] for k in params}
    curve = {int(k): v for k, v in (info.get("curve") or {}).items()}
    outcome, result = info.get("outcome"), info.get("result")
    common = {"params": params, "distributions": used}
    if metric_view:
        if outcome == "succeeded" and result is not None:
            return create_trial(state=TrialState.COMPLETE, value=result["metric"], intermediate_values=curve,
                                **common)
        return None
    if outcome == "succeeded" and result is not None:
        return create_trial(state=TrialState.COMPLETE, value=objective_value(search, result),
                            constraints=constraints(search, result), **common)
    if outcome == "pruned":
        pruned = info.get("pruned") or {}
        drop = {"drop": pruned["teacher_gap"]} if "teacher_gap" in pruned else {}
        return create_trial(state=TrialState.PRUNED, constraints=constraints(search, drop) if drop else None,
                            **common)
    if outcome in ("failed", "cancelled"):
        return create_trial(state=TrialState.FAIL, **common)
    return create_trial(state=TrialState.RUNNING, **common)


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _sampling_study(search: SearchConfig, seed: int, trials: list[Job]) -> Any:
    import optuna

    _quiet_optuna()
    direction = "maximize" if search.objective == "best" else "minimize"
    # A new seed per trial: the same rows give the same next sample, yet the startup (random) samples differ.
    sampler = optuna.samplers.TPESampler(seed=(seed * 1_000_003 + len(trials)) % 2**32,
                                         n_startup_trials=min(10, max(3, search.trials // 3)), constant_liar=True)
    study = optuna.create_study(direction=direction, sampler=sampler)
    dists = _distributions(search)
    for t in trials:
        frozen = _frozen(search, t, dists, metric_view=False)
        if frozen is not None:
            study.add_trial(frozen)
    return study


def sample(search: SearchConfig, seed: int, trials: list[Job]) -> dict[str, Any]:
    """The next trial's params, given every trial so far (deterministic in ``seed`` and the rows)."""
    import optuna.distributions as d

    study = _sampling_study(search, seed, trials)
    trial = study.ask()
    dists = _distributions(search)
    family = trial.suggest_categorical("family", list(dists["family"].choices))
    for name, dist in dists.items():
        if name == "family" or ("." in name and not name.startswith(f"{family}.")):
            continue  # another family's own argument
        if isinstance(dist, d.CategoricalDistribution):
            trial.suggest_categorical(name, list(dist.choices))
        elif isinstance(dist, d.IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
        else:
            trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    return dict(trial.params)


def _ask(s: Any, parent: Job, search: SearchConfig, trials: list[Job]) -> None:
    started = len(trials)
    in_flight = sum(t.status in _IN_FLIGHT for t in trials)
    waiting = sum(t.status == state.QUEUED for t in trials)
    seed = int(parent.spec.get("seed") or 0)
    while started < search.trials:
        if search.parallel is not None and in_flight >= search.parallel:
            break
        if search.parallel is None and waiting > 0:
            break  # a free worker would already have taken it: the workers are all busy
        params = sample(search, seed, trials)
        trial = jobs_search.create_trial(s, parent, started, params)
        estimate = _estimated_parameters(s, trial)
        if estimate is not None:
            trial.trial = {**trial.trial, "estimated_parameters": estimate}
        append_event(s, parent.id, "trial_queued", f"trial {started} queued: "
                     f"{describe_student(student_config(params))}", data={"trial": started, "job_id": trial.id,
                                                                          "params": params})
        trials.append(trial)
        started, in_flight, waiting = started + 1, in_flight + 1, waiting + 1


def _estimated_parameters(s: Any, trial: Job) -> int | None:
    """The trial's student size from metadata (app/jobs/budget.py counts the built-in families exactly), so a
    pruned or failed trial still has a place on the Pareto plot."""
    try:
        teacher = s.get(Model, trial.teacher_model_id) if trial.teacher_model_id else None
        if teacher is None:
            return None
        spec = JobSpec.model_validate(trial.spec)
        datasets = {d: ds for d in spec.dataset_ids() if (ds := s.get(Dataset, d)) is not None}
        est = budget.estimate(spec, teacher, datasets)
        return max((p for label, p in est.models.items() if label.startswith("student of step")), default=None)
    except Exception:  # noqa: BLE001 - only a plot position depends on it
        return None


# ---- pruning -----------------------------------------------------------------------------------------------------


def _prune(s: Any, search: SearchConfig, trials: list[Job]) -> None:
    import optuna

    running = [t for t in trials if t.status == state.RUNNING and not (t.trial or {}).get("pruned")]
    done = [t for t in trials if (t.trial or {}).get("outcome") == "succeeded"]
    if not running or len(done) < max(1, search.pruning.startup_trials):
        return
    _quiet_optuna()
    pruner = optuna.pruners.MedianPruner(n_startup_trials=search.pruning.startup_trials,
                                         n_warmup_steps=search.pruning.warmup_epochs)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    dists = _distributions(search)
    for t in done:
        study.add_trial(_frozen(search, t, dists, metric_view=True))
    from optuna.trial import TrialState, create_trial

    for t in running:
        curve = {int(k): v for k, v in _curve(s, t.id, search.metric).items()}
        if not curve:
            continue
        live = create_trial(state=TrialState.RUNNING, intermediate_values=curve)
        if not pruner.prune(study, live):
            continue
        epoch = max(curve)
        at_epoch = [float(d.trial["curve"][str(epoch)]) for d in done if str(epoch) in (d.trial.get("curve") or {})]
        median = statistics.median(at_epoch) if at_epoch else float("nan")
        best = max(curve.values())
        reason = (f"pruned at epoch {epoch}: its best {search.metric} so far, {best:.4f}, is below the median "
                  f"{median:.4f} of the finished trials at that epoch")
        if jobs_search.cancel_one(s, t, reason, code="pruned"):
            teacher = next((d.trial["result"]["teacher_metric"] for d in done), None)
            pruned = {"epoch": epoch, "value": best, "median": median}
            if teacher is not None:
                pruned["teacher_gap"] = teacher - best
            s.execute(update(Job).where(Job.id == t.id).values(trial={**(t.trial or {}), "pruned": pruned})
                      .execution_options(synchronize_session=False))
            append_event(s, t.parent_id, "trial_pruned", f"trial {t.trial_number} {reason}",
                         data={"trial": t.trial_number, **pruned})


# ---- the end -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The search's verdict: the winning trial's row (None: no trial met the target) and, without a winner, the
    best trial found and why it falls short."""

    winner: Job | None
    best: Job | None
    shortfall: str


def _feasible(search: SearchConfig, result: Mapping[str, Any]) -> bool:
    return all(v <= 1e-12 for v in constraints(search, result).values())


def _rank(search: SearchConfig, t: Job) -> tuple:
    r = t.trial["result"]
    size, latency, metric = r["num_parameters"], r["latency_ms"], -r["metric"]
    if search.objective == "smallest":
        return size, metric, latency, t.trial_number
    if search.objective == "fastest":
        return latency, size, metric, t.trial_number
    return metric, size, latency, t.trial_number


def choose(search: SearchConfig, trials: list[Job]) -> Choice:
    """The winner: the smallest / fastest / best succeeded trial that meets every target (ties: better metric, then
    smaller, faster, earlier). Without one, the trial closest to the targets (least total violation)."""
    done = [t for t in trials if (t.trial or {}).get("outcome") == "succeeded"]
    feasible = [t for t in done if _feasible(search, t.trial["result"])]
    if feasible:
        return Choice(min(feasible, key=lambda t: _rank(search, t)), None, "")
    if not done:
        return Choice(None, None, "no trial finished")
    best = min(done, key=lambda t: (sum(max(0.0, v) for v in constraints(search, t.trial["result"]).values()),
                                    _rank(search, t)))
    r = best.trial["result"]
    misses = []
    if (limit := search.drop_limit()) is not None and r["drop"] > limit:
        misses.append(f"{search.metric} {r['metric']:.4f}, {r['drop']:.4f} below the teacher's "
                      f"{r['teacher_metric']:.4f} (allowed {limit:g})")
    if search.max_parameters is not None and r["num_parameters"] > search.max_parameters:
        misses.append(f"{r['num_parameters']} parameters (allowed {search.max_parameters})")
    if search.max_latency_ms is not None and r["latency_ms"] > search.max_latency_ms:
        misses.append(f"{r['latency_ms']:.3f} ms (allowed {search.max_latency_ms:g} ms)")
    return Choice(None, best, "; ".join(misses))


def trials_table(search: SearchConfig, trials: list[Job]) -> list[dict[str, Any]]:
    """One row per trial, for the report and the API: number, params, status, size, latency, metric, drop,
    worker, and the error or pruning that ended it."""
    rows = []
    for t in trials:
        info = t.trial or {}
        r = info.get("result") or {}
        row = {"number": t.trial_number, "job_id": t.id, "params": info.get("params"),
               "student": describe_student(student_config(info["params"])) if info.get("params") else None,
               "status": info.get("outcome") or t.status, "num_parameters": r.get("num_parameters"),
               "estimated_parameters": info.get("estimated_parameters"), "latency_ms": r.get("latency_ms"),
               "metric": r.get("metric"), "drop": r.get("drop"), "worker": info.get("worker") or t.worker_id}
        if r:
            row["meets_target"] = _feasible(search, r)
        if info.get("pruned"):
            row["pruned"] = info["pruned"]
        if info.get("error"):
            row["error"] = info["error"]
        rows.append(row)
    return rows


def _finish(s: Any, parent: Job, storage: Storage, search: SearchConfig, trials: list[Job]) -> str:
    choice = choose(search, trials)
    if choice.winner is None:
        who = choice.best
        if who is None:
            return _end_failed(s, parent, storage, search, trials, "search_trials_failed",
                               f"none of the {len(trials)} trials finished; see the trials' errors")
        message = (f"no trial met the target ({search.objective} with {search.metric}): the best found, trial "
                   f"{who.trial_number} ({describe_student(student_config(who.trial['params']))}, "
                   f"{who.trial['result']['num_parameters']} parameters, job {who.id}), reached "
                   f"{choice.shortfall}")
        return _end_failed(s, parent, storage, search, trials, "search_no_feasible_trial", message, best=who)
    winner = choice.winner
    report = _parent_report(s, storage, search, trials, winner)
    rows = _artifacts(s, storage, parent, search, trials, report, winner)
    r = winner.trial["result"]
    metrics = {**(winner.metrics or {}), "search": {"winner": winner.trial_number, "winner_job_id": winner.id,
                                                    "num_parameters": r["num_parameters"],
                                                    "latency_ms": r["latency_ms"], "drop": r["drop"]}}
    message = (f"search succeeded: trial {winner.trial_number} "
               f"({describe_student(student_config(winner.trial['params']))}, {r['num_parameters']} parameters, "
               f"{r['latency_ms']:.3f} ms) {search.metric} {r['metric']:.4f} vs the teacher's "
               f"{r['teacher_metric']:.4f}")
    return _commit_end(s, parent, storage, rows, state.SUCCEEDED, message, metrics=metrics,
                       progress={**(parent.progress or {}), "fraction": 1.0, "eta_seconds": 0.0})


def _end_failed(s: Any, parent: Job, storage: Storage, search: SearchConfig, trials: list[Job], code: str,
                message: str, best: Job | None = None) -> str:
    report = {"search": _search_section(search, trials, None)}
    rows = _artifacts(s, storage, parent, search, trials, report, None, highlight=best)
    return _commit_end(s, parent, storage, rows, state.FAILED, message, error_code=code, error_message=message)


def _commit_end(s: Any, parent: Job, storage: Storage, rows: list[Artifact], to: str, message: str,
                **values: Any) -> str:
    try:
        for row in rows:
            s.add(row)
        s.flush()
        state.transition(s, parent.id, to, allowed_from={state.RUNNING}, **values)
    except state.InvalidTransition:
        s.rollback()
        for row in rows:
            if row.storage_key.startswith(f"artifacts/{parent.id}/"):
                storage.delete(row.storage_key)
        return parent.status
    append_event(s, parent.id, to, message, level="info" if to == state.SUCCEEDED else "error",
                 data={"code": values.get("error_code")} if to != state.SUCCEEDED else None)
    return to


def _search_section(search: SearchConfig, trials: list[Job], winner: Job | None) -> dict[str, Any]:
    return {"objective": search.objective, "metric": search.metric, "max_drop": search.drop_limit(),
            "max_parameters": search.max_parameters, "max_latency_ms": search.max_latency_ms,
            "winner": winner.trial_number if winner is not None else None,
            "winner_job_id": winner.id if winner is not None else None,
            "trials": trials_table(search, trials)}


def _parent_report(s: Any, storage: Storage, search: SearchConfig, trials: list[Job], winner: Job) -> dict:
    """The winner's own report (teacher and student rows, recipe, reproducibility) with the ``search`` section."""
    art = s.get(Artifact, winner.trial["result"]["report_artifact_id"])
    with storage.open(art.storage_key) as f:
        report = json.loads(f.read(MAX_REPORT_BYTES + 1))
    report["search"] = _search_section(search, trials, winner)
    return report


def _artifacts(s: Any, storage: Storage, parent: Job, search: SearchConfig, trials: list[Job], report: dict,
               winner: Job | None, highlight: Job | None = None) -> list[Artifact]:
    """The search's artifact rows: the winner's student files (same blobs), its report, the Pareto plot."""
    rows = []
    if winner is not None:
        for a in s.scalars(select(Artifact).where(Artifact.job_id == winner.id, Artifact.kind != "report")):
            rows.append(Artifact(id=new_id("artifact"), tenant_id=parent.tenant_id, job_id=parent.id, kind=a.kind,
                                 format=a.format, step_index=a.step_index, filename=a.filename,
                                 media_type=a.media_type, size_bytes=a.size_bytes, sha256=a.sha256,
                                 storage_key=a.storage_key))
    with tempfile.TemporaryDirectory(prefix="distillery-search-") as tmp:
        report_path = Path(tmp) / "report.json"
        report_path.write_text(json.dumps(report, indent=2, default=float))
        files = [("report", "json", report_path, "application/json")]
        plot = Path(tmp) / "search_pareto.png"
        try:
            from worker.search_plot import pareto_plot

            pareto_plot(search, trials_table(search, trials), plot, winner=winner.trial_number if winner else None,
                        highlight=highlight.trial_number if highlight is not None else None)
            files.append(("plot", "png", plot, "image/png"))
        except Exception:  # noqa: BLE001 - the plot is an extra; never fail a search over it
            log.exception("search %s: the Pareto plot could not be drawn", parent.id)
        for kind, fmt, path, media in files:
            art_id = new_id("artifact")
            blob = storage.put_file(f"artifacts/{parent.id}/{art_id}/{path.name}", path)
            rows.append(Artifact(id=art_id, tenant_id=parent.tenant_id, job_id=parent.id, kind=kind, format=fmt,
                                 step_index=None, filename=path.name, media_type=media, size_bytes=blob.size_bytes,
                                 sha256=blob.sha256, storage_key=blob.key))
    return rows


def _update_progress(s: Any, parent: Job, search: SearchConfig, trials: list[Job]) -> None:
    done = sum(t.status in _ENDED for t in trials)
    progress = {"trials_done": done, "trials": search.trials,
                "trials_running": sum(t.status in (state.RUNNING, state.CANCELLING) for t in trials),
                "trials_queued": sum(t.status == state.QUEUED for t in trials),
                "fraction": round(done / search.trials, 4), "eta_seconds": None}
    feasible = [t for t in trials if (t.trial or {}).get("outcome") == "succeeded"
                and _feasible(search, t.trial["result"])]
    if feasible:
        lead = min(feasible, key=lambda t: _rank(search, t))
        progress["leader"] = {"trial": lead.trial_number, "num_parameters": lead.trial["result"]["num_parameters"],
                              "metric": lead.trial["result"]["metric"]}
    if progress != parent.progress:  # every write of the row notifies the API's job caches: only on a change
        s.execute(update(Job).where(Job.id == parent.id).values(progress=progress)
                  .execution_options(synchronize_session=False))
        parent.progress = progress
