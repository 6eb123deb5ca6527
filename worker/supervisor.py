"""The trusted side of a job: stage its inputs, run the engine in a sandboxed executor, relay what it says.

The supervisor (this process, the Celery task) keeps the database connection; the executor
(:mod:`worker.executor`, started through :mod:`app.sandbox`) holds none. Every line the executor writes is
parsed against :data:`Message` (size-capped, typed) before it reaches the database; its artifacts are
accepted only as regular files of a known kind and format inside its out dir. Cancel and the time limit
kill the executor's process group, so they take effect in any phase (data loading, training, export).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from app import sandbox
from app.settings import Settings
from engine.values import ArtifactFile, DatasetSource, ModelSource, TeacherSource
from engine.errors import ERROR_CODES
from worker import prestart

log = logging.getLogger("distillery.worker")

#: What the executor may hand back, and how each format is served.
MEDIA_TYPES = {"torchscript": "application/octet-stream", "onnx": "application/octet-stream",
               "safetensors": "application/octet-stream", "json": "application/json", "markdown": "text/markdown",
               "png": "image/png", "hf": "application/zip", "gguf": "application/octet-stream",
               "jsonl": "application/jsonl"}
#: ``dataset``: data a job made (a generate step's completions).
ARTIFACT_KINDS = ("student", "report", "architecture", "model_card", "plot", "dataset")
MAX_ARTIFACTS = 256
#: Error codes an executor may end a job with; anything else is a protocol violation (executor_crashed).
EXECUTOR_CODES = frozenset(ERROR_CODES) | {"resource_limit", "internal_error"}
MAX_EVENTS = 20_000
MAX_METRICS = 200_000
CHECK_EVERY = 0.5  # seconds between cancel checks
#: The file (in the executor's scratch dir) whose existence asks the engine to checkpoint and stop: the
#: executor's only way in from the supervisor besides signals (a signal to bwrap would kill the sandbox).
RELEASE_FILE = "release-requested"
#: How long an executor may take to exit after its final message before it is killed (and the job failed:
#: an executor that lingers after reporting may still be writing what it just reported).
FINAL_GRACE_SECONDS = 30.0


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EventMsg(_Msg):
    type: Literal["event"]
    event: str = Field(max_length=64, pattern=r"^[a-z_][a-z0-9_.]*$")
    message: str = Field(max_length=4000)
    level: Literal["debug", "info", "warning", "error"] = "info"
    data: dict[str, Any] | None = None


class ProgressMsg(_Msg):
    type: Literal["progress"]
    progress: dict[str, Any]


class MetricMsg(_Msg):
    type: Literal["metric"]
    step: int = Field(ge=0, lt=2**62)
    epoch: int = Field(ge=0, lt=2**31)
    name: str = Field(max_length=100)
    value: float | None


class ArtifactMsg(_Msg):
    kind: Literal[ARTIFACT_KINDS]  # type: ignore[valid-type]
    format: Literal[tuple(MEDIA_TYPES)]  # type: ignore[valid-type]
    path: str = Field(max_length=255)
    step_index: int | None = Field(None, ge=0, lt=1000)


class ResultMsg(_Msg):
    type: Literal["result"]
    status: Literal["succeeded", "quality_gate"]
    message: str = Field("", max_length=4000)
    metrics: dict[str, Any] = Field(default_factory=dict)
    artifacts: list[ArtifactMsg] = Field(default_factory=list, max_length=MAX_ARTIFACTS)


class FailedMsg(_Msg):
    type: Literal["failed"]
    code: str = Field(max_length=64)
    message: str = Field(max_length=4000)
    data: dict[str, Any] = Field(default_factory=dict)


Message = TypeAdapter(Annotated[Union[EventMsg, ProgressMsg, MetricMsg, ResultMsg, FailedMsg],
                                Field(discriminator="type")])


# ---- how a job's executor ended ------------------------------------------------------------------
@dataclass
class Finished:
    """The engine finished: ``status`` succeeded, or quality_gate (with the artifacts of the last good step)."""

    status: str
    message: str
    metrics: dict[str, Any]
    artifacts: list[ArtifactFile]


@dataclass
class Failed:
    code: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stopped:
    """The supervisor stopped the executor because the job is no longer running (cancel, or reaped)."""


@dataclass
class Released:
    """The worker is shutting down: the executor checkpointed (or was stopped at the deadline); the job goes
    back to the queue for another worker."""


Ending = Union[Finished, Failed, Stopped, Released]


class Release:
    """A graceful release asked by the worker's shutdown: write :data:`RELEASE_FILE` once, kill the executor
    if it has not exited ``seconds`` later."""

    def __init__(self, requested: Callable[[], bool], seconds: float):
        self.requested, self.seconds = requested, seconds
        self.deadline: float | None = None

    def check(self, ex: sandbox.Executor, scratch: Path) -> None:
        if self.deadline is None and self.requested():
            self.deadline = time.monotonic() + self.seconds
            (scratch / RELEASE_FILE).touch()
            log.info("release requested: the executor checkpoints and stops within %.0f s", self.seconds)
        elif self.deadline is not None and time.monotonic() > self.deadline:
            ex.kill("released")

    @property
    def active(self) -> bool:
        return self.deadline is not None


class Relay:
    """Where validated messages go (the worker's DbReporter) plus the job's cancel check."""

    def __init__(self, reporter: Any):
        self.reporter = reporter
        self.events = self.metrics = 0

    def apply(self, msg: EventMsg | ProgressMsg | MetricMsg) -> None:
        if isinstance(msg, EventMsg):
            self.events += 1
            if self.events <= MAX_EVENTS:
                self.reporter.event(msg.event, msg.message, level=msg.level, data=_capped(msg.data))
        elif isinstance(msg, ProgressMsg):
            self.reporter.progress(_capped(msg.progress) or {})
        elif isinstance(msg, MetricMsg) and msg.value is not None:
            self.metrics += 1
            if self.metrics <= MAX_METRICS:
                self.reporter.metric(step=msg.step, epoch=msg.epoch, name=msg.name, value=msg.value)


def _capped(data: dict | None, limit: int = 64 * 1024) -> dict | None:
    """Event data stored as sent when small; otherwise replaced by a note (the executor is untrusted)."""
    if data is None:
        return None
    if len(json.dumps(data)) > limit:
        return {"truncated": True}
    return data


# ---- staging ---------------------------------------------------------------------------------------
@dataclass
class JobFiles:
    """What a job reads: the spec and each input as a local (trusted) path."""

    spec: dict
    teacher: TeacherSource
    datasets: dict[str, DatasetSource]
    models: dict[str, ModelSource]


class CheckpointTarget(Protocol):
    """Where an attempt's checkpoints come from and go to (:class:`worker.checkpoints.AttemptCheckpoints`)."""

    def restore(self, dst: Path) -> bool: ...
    def push(self, src: Path) -> None: ...


def stage(files: JobFiles, scratch: Path, checkpoints: CheckpointTarget, settings: Settings
          ) -> tuple[Path, dict[str, Path]]:
    """Write ``scratch/job.json`` (paths relative to ``scratch``) and restore the last checkpoint into
    ``scratch/checkpoints``.

    Returns the job file and the inputs to expose read-only (``inputs/<name>`` → host path)."""
    inputs: dict[str, Path] = {"teacher": files.teacher.path}
    datasets = {}
    for i, (ds_id, ds) in enumerate(files.datasets.items()):
        inputs[f"dataset-{i}"] = ds.path
        datasets[ds_id] = {"path": f"inputs/dataset-{i}", "format": ds.format, "sha256": ds.sha256,
                           "inputs": list(ds.inputs), "options": ds.options}
    models = {}
    for i, (m_id, m) in enumerate(files.models.items()):
        inputs[f"model-{i}"] = m.path
        models[m_id] = {"path": f"inputs/model-{i}", "format": m.format, "architecture": m.architecture,
                        "sha256": m.sha256}
    checkpoints.restore(scratch / "checkpoints")
    job = {"spec": files.spec, "out_dir": "out", "checkpoint_dir": "checkpoints",
           "teacher": {"path": "inputs/teacher", "format": files.teacher.format, "task": files.teacher.task,
                       "sha256": files.teacher.sha256, "architecture": files.teacher.architecture},
           "datasets": datasets, "models": models, "device": settings.device, "threads": settings.worker_threads,
           "checkpoint_every_seconds": settings.checkpoint_seconds}
    path = scratch / "job.json"
    path.write_text(json.dumps(job))
    return path, inputs


class CheckpointSync:
    """Push the executor's checkpoint dir to blob storage whenever its checkpoint file changes, so a lost
    worker's successor resumes from it (the executor itself cannot reach storage)."""

    def __init__(self, scratch_dir: Path, target: CheckpointTarget):
        self.src, self.target = scratch_dir, target
        self._lock = threading.Lock()
        self.seen = self._stamp()  # what was staged in is already in storage

    def _stamp(self) -> int:
        try:
            st = (self.src / "checkpoint.pt").lstat()
        except OSError:
            return 0
        return st.st_mtime_ns if (st.st_mode & 0o170000) == 0o100000 else 0

    def poll(self) -> None:
        with self._lock:  # the relay (on checkpoint_saved) and the cancel watch both call this
            stamp = self._stamp()
            if stamp and stamp != self.seen:
                try:
                    self.target.push(self.src)
                except Exception:  # storage away: the job goes on; the next change (or tick) pushes again
                    log.exception("checkpoint push failed; retrying on the next check")
                    return
                self.seen = stamp


# ---- running -----------------------------------------------------------------------------------------
def executor_argv(job_file: Path) -> list[str]:
    """The executor's command line (tests replace it with a misbehaving one)."""
    return [sys.executable, "-m", "worker.executor", str(job_file)]



def job_limits(settings: Settings) -> sandbox.Limits:
    return sandbox.Limits(memory_bytes=settings.max_job_memory_bytes, wall_seconds=settings.max_job_seconds,
                          open_files=settings.executor_max_open_files, file_bytes=settings.executor_max_file_bytes,
                          scratch_bytes=settings.executor_scratch_bytes)


def supervise(files: JobFiles, scratch: Path, checkpoints: CheckpointTarget, settings: Settings, reporter: Any,
              should_stop: Callable[[], bool], *, should_release: Callable[[], bool] = lambda: False,
              release_seconds: float = 20.0) -> Ending:
    """Run the job's engine in an executor under ``settings``' sandbox and limits; return how it ended.

    ``reporter`` receives the executor's events/progress/metrics; ``should_stop`` (polled every
    :data:`CHECK_EVERY` seconds, from a thread, so a silent executor is still stopped) says the job was
    cancelled or taken away; ``should_release`` (polled the same way) that the worker is shutting down.
    The newest checkpoint is restored from ``checkpoints`` and each new one pushed to it."""
    scratch.mkdir(parents=True, exist_ok=True)
    # An executor started before this job (worker/prestart.py) takes the job's directory before anything is
    # written into it; a job that cannot use it starts a fresh one.
    waiting = prestart.adopt(scratch)
    proxy = None
    try:
        if files.teacher.format == "endpoint":  # a served teacher: the executor's one way out (teacher_proxy.py)
            from worker.teacher_proxy import EndpointRefused, TeacherProxy

            try:
                proxy = TeacherProxy(scratch, files.spec["teacher"]["endpoint"], settings)
            except EndpointRefused as exc:
                return Failed("invalid_spec", str(exc))
            files = dataclasses.replace(files, teacher=dataclasses.replace(files.teacher, path=proxy.config_path))
        return _supervise(files, scratch, checkpoints, settings, reporter, should_stop, should_release,
                          release_seconds, waiting)
    finally:
        if waiting is not None and waiting.started is None:  # adopted, but never given this job: it ends here
            waiting.kill("unused")
            waiting.wait()
        if proxy is not None:
            proxy.close()


def _supervise(files: JobFiles, scratch: Path, checkpoints: CheckpointTarget, settings: Settings, reporter: Any,
               should_stop: Callable[[], bool], should_release: Callable[[], bool], release_seconds: float,
               waiting: sandbox.Executor | None = None) -> Ending:
    job_file, inputs = stage(files, scratch, checkpoints, settings)
    ex = _begin(waiting, job_file, inputs) if waiting is not None else None
    if ex is None:
        ex = sandbox.spawn(executor_argv(job_file), scratch=scratch, inputs=inputs, limits=job_limits(settings),
                           mode=sandbox.resolve_mode(settings.sandbox), secret_dirs=[settings.data_dir],
                           max_line=settings.executor_message_bytes)
    sync = CheckpointSync(scratch / "checkpoints", checkpoints)
    relay, final = Relay(reporter), None
    release = Release(should_release, release_seconds)
    stopped = _watch_cancel(ex, should_stop, sync, lambda: release.check(ex, scratch))
    try:
        for line in ex.lines():
            try:
                msg = Message.validate_json(line)
            except ValidationError as exc:
                log.warning("executor sent an invalid message: %s", str(exc)[:300])
                ex.kill("protocol")
                break
            if isinstance(msg, (ResultMsg, FailedMsg)):
                final = msg
                break
            if isinstance(msg, EventMsg) and msg.event == "checkpoint_saved":
                sync.poll()  # in storage before anything said after it is recorded
            relay.apply(msg)
        if final is not None:
            _await_exit(ex)
    except BaseException:
        # The supervisor itself failed (e.g. the database went away while relaying): the executor must not
        # run on unsupervised. Its last checkpoint is kept for the attempt that takes the job over.
        ex.kill("supervisor_failed")
        raise
    finally:
        outcome = ex.wait()
        stopped.set()
        sync.poll()
    if release.active and not (isinstance(final, ResultMsg) and outcome.returncode == 0):
        return Released()
    return _ending(outcome, final, scratch / "out", settings)


def _begin(waiting: sandbox.Executor, job_file: Path, inputs: dict[str, Path]) -> sandbox.Executor | None:
    """Give the adopted executor its inputs and its job; None (it is killed) when that cannot be done."""
    try:
        waiting.place_inputs(inputs)
        waiting.begin(job_file.name)
        return waiting
    except OSError as exc:  # inputs on another file system, or it died while waiting
        log.info("the waiting executor cannot take this job (%s); starting a fresh one", exc)
        waiting.kill("unused")
        waiting.wait()
        for name in inputs:  # the fresh executor's mount points (or copies) go where these links were
            (job_file.parent / "inputs" / name).unlink(missing_ok=True)
        return None


def _await_exit(ex: sandbox.Executor) -> None:
    """After its final message the executor has nothing left to do but exit; one that does not is killed."""
    try:
        ex.proc.wait(FINAL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        ex.kill("lingered")


def _watch_cancel(ex: sandbox.Executor, should_stop: Callable[[], bool], sync: CheckpointSync,
                  on_tick: Callable[[], None] = lambda: None) -> threading.Event:
    """A thread that mirrors checkpoints and kills the executor once ``should_stop`` says so; set the returned
    event to end it."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(CHECK_EVERY):
            if ex.proc.poll() is not None:
                return
            try:
                sync.poll()
                on_tick()
                if should_stop():
                    ex.kill("stopped")
                    return
            except Exception:  # the database may be briefly away; the lease says what happens next
                log.exception("cancel check failed")

    threading.Thread(target=loop, name="distillery-cancel-watch", daemon=True).start()
    return done


def _ending(outcome: sandbox.Outcome, final: ResultMsg | FailedMsg | None, out_dir: Path,
            settings: Settings) -> Ending:
    if outcome.killed == "stopped":
        return Stopped()
    if outcome.limit is not None:
        return Failed("resource_limit", _limit_message(outcome.limit, settings), {"limit": outcome.limit})
    if outcome.killed == "lingered":
        return Failed("executor_crashed", f"the executor did not exit within {FINAL_GRACE_SECONDS:.0f} s of its "
                                          "final message and was stopped")
    if outcome.killed == "protocol":
        return Failed("executor_crashed", "the executor broke the message protocol (an oversized or malformed "
                                          "line) and was stopped", {"stderr": outcome.stderr_tail[-2000:]})
    if isinstance(final, ResultMsg) and outcome.returncode == 0:
        try:
            artifacts = [_accept(a, out_dir, settings) for a in final.artifacts]
        except ValueError as exc:
            return Failed("executor_crashed", f"the executor returned an unacceptable artifact: {exc}")
        return Finished(final.status, final.message, final.metrics, artifacts)
    if isinstance(final, FailedMsg):
        if final.code not in EXECUTOR_CODES:
            return Failed("executor_crashed", f"the executor ended with an unknown code {final.code[:64]!r}")
        if final.code == "resource_limit":
            limit = str(final.data.get("limit", "memory"))[:32]
            return Failed("resource_limit", f"{_limit_message(limit, settings)} ({final.message[:500]})",
                          {"limit": limit})
        return Failed(final.code, final.message, final.data if final.code == "internal_error" else {})
    if outcome.signal is not None:
        return Failed("executor_crashed", f"the executor was killed by {outcome.signal_name}",
                      {"signal": outcome.signal_name, "stderr": outcome.stderr_tail[-2000:]})
    return Failed("executor_crashed", f"the executor exited with status {outcome.returncode} without a result",
                  {"stderr": outcome.stderr_tail[-2000:]})


def _limit_message(limit: str, settings: Settings) -> str:
    return {
        "memory": f"the job used more than its memory limit of {settings.max_job_memory_bytes / 2**30:.1f} GiB "
                  "(DISTILLERY_MAX_JOB_MEMORY_BYTES)",
        "wall_time": f"the job ran longer than its time limit of {settings.max_job_seconds} s "
                     "(DISTILLERY_MAX_JOB_SECONDS)",
        "disk": f"the job wrote more than {settings.executor_scratch_bytes / 2**30:.1f} GiB to its scratch "
                "directory (DISTILLERY_EXECUTOR_SCRATCH_BYTES)",
        "cpu_time": "the job used more CPU time than its limit allows (DISTILLERY_MAX_JOB_SECONDS × CPUs)",
        "file_size": f"the job wrote a file larger than {settings.executor_max_file_bytes / 2**30:.1f} GiB "
                     "(DISTILLERY_EXECUTOR_MAX_FILE_BYTES)",
    }.get(limit, f"the job hit its {limit} limit")


def _accept(art: ArtifactMsg, out_dir: Path, settings: Settings) -> ArtifactFile:
    """An artifact is a regular file directly named inside the out dir (no links, no escapes), within size."""
    rel = Path(art.path)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\x00" in art.path:
        raise ValueError(f"path {art.path!r} is not inside the output directory")
    path = out_dir / rel
    for parent in [path, *path.parents]:
        if parent == out_dir:
            break
        if parent.is_symlink():
            raise ValueError(f"{art.path!r} goes through a symbolic link")
    st = path.lstat() if path.exists() or path.is_symlink() else None
    if st is None or (st.st_mode & 0o170000) != 0o100000:
        raise ValueError(f"{art.path!r} is not a regular file")
    if st.st_size > settings.executor_max_file_bytes:
        raise ValueError(f"{art.path!r} is larger than the artifact limit")
    return ArtifactFile(art.kind, art.format, path, art.step_index, MEDIA_TYPES[art.format])

