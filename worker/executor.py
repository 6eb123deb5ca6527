"""The untrusted side of a job: ``python -m worker.executor job.json``, run inside the sandbox.

It reads the job file the supervisor staged in its scratch directory (paths relative to it), runs
:func:`engine.run`, and tells the supervisor everything as JSON lines on its original stdout:

``{"type": "event", "event": str, "message": str, "level": str, "data": dict | null}``
``{"type": "progress", "progress": dict}``
``{"type": "metric", "step": int, "epoch": int, "name": str, "value": float}``
``{"type": "result", "status": "succeeded" | "quality_gate", "message": str, "metrics": dict,
   "artifacts": [{"kind", "format", "path" (relative to the out dir), "step_index"}]}``
``{"type": "failed", "code": str, "message": str, "data": dict}``

Anything else the engine or a library prints goes to stderr (fd 1 is re-pointed there at start), so it can
never be mistaken for a message. The supervisor trusts none of this: it validates every line.
Imports only the standard library and the engine (no database, broker or settings: it has no credentials).
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO


#: Written into the scratch dir (our cwd) by the supervisor when the worker shuts down
#: (``worker.supervisor.RELEASE_FILE``).
RELEASE_FILE = "release-requested"


class PipeReporter:
    """The engine's Reporter, writing JSON lines to the supervisor. Cancelling is the supervisor's job (it kills
    this process); :meth:`should_stop` only answers a graceful release: once the supervisor asks for one, the
    next epoch end writes a checkpoint and the engine stops after it."""

    def __init__(self, out: TextIO, release_file: Path = Path(RELEASE_FILE)):
        self.out = out
        self.release_file = release_file
        self._next_look = 0.0

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(_plain(message), allow_nan=False) + "\n")
        self.out.flush()

    def event(self, type: str, message: str, *, level: str = "info", data: dict | None = None) -> None:
        self.send({"type": "event", "event": type, "message": message, "level": level, "data": data})

    def progress(self, progress: dict) -> None:
        self.send({"type": "progress", "progress": progress})

    def metric(self, *, step: int, epoch: int, name: str, value: float) -> None:
        self.send({"type": "metric", "step": step, "epoch": epoch, "name": name, "value": value})

    def should_stop(self) -> bool:
        from engine.training.checkpoint import URGENT, request_checkpoint

        if URGENT.written:
            return True
        now = time.monotonic()
        if not URGENT.requested and now >= self._next_look:  # a stat at most every 0.2 s, per batch otherwise
            self._next_look = now + 0.2
            if self.release_file.exists():
                request_checkpoint()
        return False


def _plain(value: Any) -> Any:
    """numpy scalars → Python; NaN/inf → None (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _artifacts(result: Any, out_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for art in result.artifacts:
        # Paths are sent relative to the out dir (the supervisor sees this scratch at another path).
        rel = Path(art.path).resolve().relative_to(out_dir.resolve())
        rows.append({"kind": art.kind, "format": art.format, "path": str(rel), "step_index": art.step_index})
    return rows


def _surroundings() -> dict[str, Any]:
    """What this process can see of the world, for the job's events (operators and tests check it): the
    names of its environment variables, its user and its network interfaces (only ``lo`` in a sandbox)."""
    try:
        interfaces = sorted(name for _i, name in socket.if_nameindex())
    except OSError:
        interfaces = []
    return {"env": sorted(os.environ), "uid": os.getuid(), "network_interfaces": interfaces}


def _resource_error(exc: BaseException) -> str | None:
    """The limit an exception means we ran into, if any (the rlimits surface as these errors)."""
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "file_size"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "disk"
    text = str(exc)
    if "can't allocate memory" in text or "Cannot allocate memory" in text or "std::bad_alloc" in text:
        return "memory"
    return None


#: ``python -m worker.executor --wait``: started before its job (:mod:`worker.prestart`), it imports what
#: every job needs, then reads its job file's name from stdin.
WAIT = "--wait"
#: What a waiting executor imports ahead (best effort): the engine's pipeline with every registered component
#: (``engine.run`` is imported lazily) and the heavy modules a classic job loads on first use (the optimizer's
#: first step imports torch._dynamo; the exports onnx and onnxruntime; the plots matplotlib).
PRELOAD = ("engine.pipeline.run", "torch._dynamo", "onnx", "onnxruntime", "safetensors.torch",
           "matplotlib.backends.backend_agg", "matplotlib.figure")


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the job that needs it reports the failure
            pass


def main(argv: list[str]) -> int:
    # Keep the real stdout for messages; everything else that writes to fd 1 now lands on stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    prestarted = argv[:1] == [WAIT]
    if prestarted:
        _preload()
        name = sys.stdin.readline().strip()
        if not name:  # the worker discarded it (or went away) before giving it a job
            return 0
        argv = [name]
    reporter = PipeReporter(out)
    reporter.event("executor_started", "the engine runs in a sandboxed executor", level="debug",
                   data={**_surroundings(), "prestarted": prestarted})
    job = json.loads(Path(argv[0]).read_text())
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import engine

        teacher = engine.TeacherSource(**{**job["teacher"], "path": Path(job["teacher"]["path"])})
        datasets = {k: engine.DatasetSource(**{**v, "path": Path(v["path"]), "inputs": tuple(v["inputs"])})
                    for k, v in job["datasets"].items()}
        models = {k: engine.ModelSource(**{**v, "path": Path(v["path"])}) for k, v in job["models"].items()}
        result = engine.run(job["spec"], teacher, datasets, out_dir, reporter, device=job["device"],
                            threads=job["threads"], models=models, checkpoint_dir=Path(job["checkpoint_dir"]),
                            checkpoint_every_seconds=job["checkpoint_every_seconds"])
        reporter.send({"type": "result", "status": "succeeded", "message": "", "metrics": result.metrics,
                       "artifacts": _artifacts(result, out_dir)})
    except BaseException as exc:  # noqa: BLE001 - every ending is reported to the supervisor
        return _report_failure(reporter, exc, out_dir)
    return 0


def _report_failure(reporter: PipeReporter, exc: BaseException, out_dir: Path) -> int:
    import engine

    if isinstance(exc, engine.QualityGateFailed):
        reporter.send({"type": "result", "status": "quality_gate", "message": exc.message,
                       "metrics": exc.result.metrics, "artifacts": _artifacts(exc.result, out_dir)})
        return 0
    if isinstance(exc, engine.EngineError):
        reporter.send({"type": "failed", "code": exc.code, "message": exc.message, "data": {}})
        return 1
    limit = _resource_error(exc)
    if limit is not None:
        reporter.send({"type": "failed", "code": "resource_limit", "message": f"{exc.__class__.__name__}: {exc}"[:2000],
                       "data": {"limit": limit}})
        return 1
    reporter.send({"type": "failed", "code": "internal_error", "message": f"{exc.__class__.__name__}: {exc}"[:2000],
                   "data": {"traceback": traceback.format_exc()[-4000:]}})
    return 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Every file the job made is written and closed and its final message sent: exit now. An orderly interpreter
    # shutdown with torch, onnxruntime and matplotlib loaded took about 1 s — more than a small job's training —
    # and nothing in it matters to the job.
    sys.stderr.flush()
    os._exit(code)
