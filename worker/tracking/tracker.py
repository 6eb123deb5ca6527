"""One job's tracker: a thread of its own drives the job's :class:`~worker.tracking.mlflow.MlflowRun`.

The job never waits on the tracking server. The run is opened while the engine starts; per-epoch metrics are
streamed as the supervisor records them (queued here, sent in batches at most ``FLUSH_SECONDS`` apart);
after the job's terminal transition :meth:`MlflowTracker.finish` hands the ending over and waits for the run
to be completed for at most ``DISTILLERY_MLFLOW_FINISH_SECONDS``. The first failing call ends the tracking
(state ``failed``, a warning event saying what happened); the job goes on and ends as it would have.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from app.db.models import Job
from app.db.session import session_scope
from app.jobs import state
from app.jobs.tracking import FAILED, LOGGED, PENDING, mlflow_state
from engine.values import ArtifactFile
from worker.tracking import names
from worker.tracking.journal import Journal
from worker.tracking.mlflow import RUN_STATUS, Ending, MlflowRun, Point, TrackedJob, TrackingRefused

log = logging.getLogger("distillery.worker")
FLUSH_SECONDS = 1.0
MAX_BATCH = 1000
_STOP = object()


class MlflowTracker:
    def __init__(self, job: TrackedJob, tracking_uri: str, journal: Journal, *, finish_seconds: float,
                 await_seconds: int):
        self.job, self.uri, self.journal = job, tracking_uri, journal
        self.finish_seconds, self.await_seconds = finish_seconds, await_seconds
        self.run: MlflowRun | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._failed = threading.Event()
        self._artifacts: list[ArtifactFile] = []
        self._thread = threading.Thread(target=self._main, name=f"mlflow-{job.job_id}", daemon=True)
        self._thread.start()

    # ---- called from the job's side (never blocks on the network) -------------------------------------
    def metric(self, *, step: int, epoch: int, name: str, value: float) -> None:
        if not self._failed.is_set():
            self._queue.put(Point(names.metric_key(step, name), float(value), int(epoch), int(time.time() * 1000)))

    def keep(self, artifacts: list[ArtifactFile]) -> None:
        """The files the executor handed back (still in the attempt's work dir until :meth:`finish` returns)."""
        self._artifacts = list(artifacts)

    def finish(self, ended: str) -> None:
        """After the attempt's terminal transition: complete the run with the job's ending, waiting at most
        ``finish_seconds``. Any other ending (released, fenced out) leaves the run open for the next attempt."""
        if ended not in state.TERMINAL:
            self.abandon()
            return
        self.journal.ended = True
        try:
            ending = self._ending(ended)
        except Exception:  # noqa: BLE001 - the database went away right after the transition
            log.exception("job %s: could not read its ending for the tracker", self.job.job_id)
            ending = Ending(status=ended, artifacts=self._artifacts)
        self._queue.put(ending)
        self._thread.join(self.finish_seconds)
        if self._thread.is_alive():
            self._fail(f"the tracking server did not complete the run within {self.finish_seconds:g} s "
                       "(DISTILLERY_MLFLOW_FINISH_SECONDS)")
        self.journal.close()

    def abandon(self) -> None:
        self._queue.put(_STOP)
        self.journal.close()

    def _ending(self, ended: str) -> Ending:
        with session_scope() as s:
            job = s.get(Job, self.job.job_id)
            if job is None:
                return Ending(status=ended, artifacts=self._artifacts)
            return Ending(status=ended, error_code=job.error_code, error_message=job.error_message,
                          metrics=dict(job.metrics or {}), artifacts=self._artifacts)

    # ---- the tracker's thread ----------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.run = MlflowRun(self.uri, self.job)
            self.run.start()
        except Exception as exc:  # noqa: BLE001 - whatever the client raises, the job goes on
            self._fail("opening the run", exc)
            return
        self.journal.record(self._state(PENDING), f"MLflow run {self.run.run_id} open in experiment "
                            f"'{self.job.request.experiment}'", data=self._ids())
        pending: list[Point] = []
        due = 0.0
        while True:
            try:
                item = self._queue.get(timeout=max(due - time.monotonic(), 0.0) if pending else None)
            except queue.Empty:
                item = None
            if isinstance(item, Point):
                if not pending:
                    due = time.monotonic() + FLUSH_SECONDS
                pending.append(item)
                if len(pending) < MAX_BATCH:
                    continue
            if pending:
                try:
                    self.run.log_metrics(pending)
                except Exception as exc:  # noqa: BLE001
                    self._fail("logging metrics", exc)
                    return
                pending = []
            if item is _STOP:
                return
            if isinstance(item, Ending):
                self._complete(item)
                return

    def _complete(self, ending: Ending) -> None:
        assert self.run is not None
        try:
            version = self.run.finish(ending, await_seconds=self.await_seconds)
        except Exception as exc:  # noqa: BLE001
            self._fail("registering the model" if isinstance(exc, TrackingRefused) else "completing the run", exc)
            return
        registered = (f"; registered '{self.job.request.register_.name}' version {version}"  # type: ignore[union-attr]
                      if version else "")
        self.journal.record(self._state(LOGGED, model_version=version),
                            f"MLflow run {self.run.run_id} ended {RUN_STATUS[ending.status]}{registered}",
                            data={**self._ids(), "model_version": version})

    # ---- state -------------------------------------------------------------------------------------
    def _fail(self, what: str, exc: BaseException | None = None) -> None:
        if self._failed.is_set():
            return
        self._failed.set()
        reason = what if exc is None else f"{what}: {_summary(exc)}"
        log.warning("job %s: tracking failed (%s)", self.job.job_id, reason)
        self.journal.record(self._state(FAILED, error=reason),
                            f"tracking failed, the job goes on without it: {reason}", level="warning",
                            data={**self._ids(), "tracking_uri": self.uri})

    def _ids(self) -> dict[str, Any]:
        run = self.run
        return {"run_id": run.run_id if run else None, "experiment_id": run.experiment_id if run else None}

    def _state(self, status: str, *, model_version: str | None = None, error: str | None = None) -> dict:
        return mlflow_state(status, **self._ids(), model_version=model_version, error=error)


def _summary(exc: BaseException, limit: int = 500) -> str:
    """The first line of an error, bounded: MLflow's messages repeat the URL and every retry."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if type(exc).__name__ not in text and not isinstance(exc, TrackingRefused):
        text = f"{type(exc).__name__}: {text}"
    return text[:limit]
