"""The next job's executor, started before its job.

A fresh executor pays the interpreter's start and its imports — torch, the engine, and what a job loads on
first use (``torch._dynamo`` at the optimizer's first step, onnx and onnxruntime for the exports): about 2 s on
a CPU host, more than the whole training of a small cached job (``benchmarks/job_overhead.py``). So a worker
keeps one executor started ahead, in the sandbox a fresh one gets (same binds, environment and limits), waiting
on its stdin with those modules imported (``python -m worker.executor --wait``).

* **Never reused, never shared.** A waiting executor has seen no tenant's data. It is given to exactly one job
  (:func:`adopt`) and ends with it; the worker then starts the next one (:func:`prepare`, after each job).
* **Its scratch becomes the job's work directory** by a rename (same file system, ``data_dir/work``): the
  sandbox bound the directory, not its name, and every path the job file gives is relative to it.
* **Inputs arrive after the start**: the sandbox binds ``scratch/inputs`` read-only, and the trusted side links
  the job's inputs into it (:meth:`app.sandbox.Executor.place_inputs`). Where that cannot be done (inputs on
  another file system), or the waiting executor died, or it has waited longer than :data:`MAX_WAIT_SECONDS`,
  the job gets a fresh executor as before: a waiting one only ever saves time.
* **Its wall clock starts with its job**; memory, CPU-time, file and disk limits apply while it waits too.
* **Under bubblewrap only.** Inside its mount namespace the directory keeps the path it was bound at, so the
  absolute paths its environment and imports hold (``HOME``, ``TMPDIR``, caches) stay valid after the rename;
  a ``process``-mode executor would see the rename, so there each job starts a fresh one.

Start one only from the thread that runs jobs (the Celery worker's main thread): the kernel's parent-death
signal is tied to the thread that started the child.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from app import sandbox
from app.sweep import WAITING_PREFIX  # data_dir/work/.waiting-<hex>; the sweep knows them
from app.settings import Settings

log = logging.getLogger("distillery.prestart")
#: A waiting executor older than this is replaced rather than used (its code may have been upgraded meanwhile).
MAX_WAIT_SECONDS = 6 * 3600.0


@dataclass
class Waiting:
    ex: sandbox.Executor
    scratch: Path
    born: float

    def usable(self) -> bool:
        return self.ex.proc.poll() is None and time.monotonic() - self.born < MAX_WAIT_SECONDS

    def discard(self) -> None:
        self.ex.kill("unused")
        self.ex.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)


_waiting: Waiting | None = None


def wait_argv() -> list[str]:
    from worker.executor import WAIT  # standard library only: cheap to import here

    return [sys.executable, "-m", "worker.executor", WAIT]


def prepare(settings: Settings) -> None:
    """Make sure this worker has an executor waiting for its next job (no-op when it has a usable one, or
    ``DISTILLERY_EXECUTOR_PRESTART`` is off). Never raises: without one, the next job starts a fresh executor."""
    global _waiting
    if not settings.executor_prestart:
        return
    if _waiting is not None:
        if _waiting.usable():
            return
        _waiting.discard()
        _waiting = None
    mode = sandbox.resolve_mode(settings.sandbox)
    if mode != "bwrap":
        # Without a mount namespace the executor would see its directory's rename: HOME, TMPDIR and the caches
        # its imports noted would point at a path that no longer exists. Each job starts a fresh one.
        return
    from worker.supervisor import job_limits  # the limits every executor gets

    scratch = settings.data_dir / "work" / f"{WAITING_PREFIX}{secrets.token_hex(8)}"
    try:
        scratch.mkdir(parents=True)
        ex = sandbox.spawn(wait_argv(), scratch=scratch, inputs={}, limits=job_limits(settings),
                           mode=mode, secret_dirs=[settings.data_dir],
                           max_line=settings.executor_message_bytes, waiting=True)
    except Exception:
        log.exception("could not start a waiting executor; the next job starts its own")
        shutil.rmtree(scratch, ignore_errors=True)
        return
    _waiting = Waiting(ex, scratch, time.monotonic())


def adopt(scratch: Path) -> sandbox.Executor | None:
    """The waiting executor, its scratch directory renamed to ``scratch`` (which must be an empty directory),
    or None (none waiting, or it cannot be used: the caller starts a fresh one). Once adopted it belongs to
    that job: :meth:`~app.sandbox.Executor.place_inputs` and :meth:`~app.sandbox.Executor.begin` it, or kill it."""
    global _waiting
    waiting, _waiting = _waiting, None
    if waiting is None:
        return None
    if not waiting.usable():
        waiting.discard()
        return None
    try:
        os.rename(waiting.scratch, scratch)
    except OSError as exc:
        log.warning("could not hand the waiting executor its job's directory (%s); starting a fresh one", exc)
        waiting.discard()
        return None
    waiting.ex.scratch = scratch  # the disk watch measures the job's directory from now on
    return waiting.ex


def shutdown() -> None:
    """Stop the waiting executor (the worker is stopping)."""
    global _waiting
    waiting, _waiting = _waiting, None
    if waiting is not None:
        waiting.discard()
