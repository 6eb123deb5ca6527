"""Public value types of the engine: what the worker passes in and gets back.

This module is stdlib-only on purpose: importing it (or ``worker.engine``) must
not pull in torch, so light callers such as the upload inspector stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

#: Error codes an :class:`EngineError` may carry. The worker maps them onto job
#: failure reasons, so keep them stable.
ERROR_CODES = (
    "invalid_model",  # the teacher file cannot be loaded or run
    "invalid_dataset",  # the dataset file or one of its arrays is unusable
    "shape_mismatch",  # dataset and teacher do not fit together
    "invalid_spec",  # the job spec is malformed (unknown key, bad value, ...)
    "unsupported",  # well-formed but not implemented (format, task, device)
    "export_failed",  # an export could not be produced or failed verification
    "cancelled",  # the reporter asked the job to stop
)


@dataclass(frozen=True)
class TeacherSource:
    """A teacher model file on local disk.

    ``format`` is ``"torchscript"`` or ``"onnx"``; ``sha256`` is the digest the
    API recorded at upload (recomputed by the engine when empty).
    """

    path: Path
    format: str
    task: str = "classification"
    sha256: str = ""


@dataclass(frozen=True)
class DatasetSource:
    """A dataset file on local disk (``.npz``).

    ``inputs`` names the arrays fed to the model; only one input is supported
    now. Held-out arrays, when present, are named ``<input>_val`` and ``y_val``.
    """

    path: Path
    format: str = "npz"
    sha256: str = ""
    inputs: tuple[str, ...] = ("x",)


@runtime_checkable
class Reporter(Protocol):
    """Sink for everything a running job tells the outside world.

    ``progress`` receives a dict with keys ``step_index``, ``step_kind``,
    ``epoch``, ``epochs``, ``fraction`` (0..1 over the whole job) and
    ``eta_seconds`` (float or None). ``should_stop`` is polled every batch; when
    it returns True the engine raises :class:`Cancelled`.
    """

    def event(self, type: str, message: str, *, level: str = "info", data: dict | None = None) -> None: ...

    def progress(self, progress: dict) -> None: ...

    def metric(self, *, step: int, epoch: int, name: str, value: float) -> None: ...

    def should_stop(self) -> bool: ...


class NullReporter:
    """A reporter that records nothing and never asks to stop (handy in scripts)."""

    def event(self, type: str, message: str, *, level: str = "info", data: dict | None = None) -> None:
        pass

    def progress(self, progress: dict) -> None:
        pass

    def metric(self, *, step: int, epoch: int, name: str, value: float) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass
class ArtifactFile:
    """One file the job produced in ``out_dir``.

    ``kind``: "student" | "report" | "architecture";
    ``format``: "torchscript" | "onnx" | "safetensors" | "json";
    ``step_index``: the step that produced it (None for the report).
    """

    kind: str
    format: str
    path: Path
    step_index: int | None
    media_type: str


@dataclass
class EngineResult:
    """What :func:`worker.engine.run` returns on success."""

    artifacts: list[ArtifactFile]
    metrics: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)


class EngineError(Exception):
    """A failure the user can act on; ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Cancelled(EngineError):
    """Raised when ``reporter.should_stop()`` returned True."""

    def __init__(self, message: str = "job cancelled by request"):
        super().__init__("cancelled", message)
