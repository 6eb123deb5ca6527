"""Public value types of the engine: what the worker passes in and gets back.

This module is stdlib-only on purpose: importing it (or ``engine``) must
not pull in torch, so light callers such as the upload inspector stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

@dataclass(frozen=True)
class TeacherSource:
    """A teacher model file on local disk.

    ``format``: ``"torchscript" | "onnx" | "torch_export" | "safetensors"``;
    ``task``: ``"classification" | "regression" | "embedding"``; ``sha256`` is
    the digest the API recorded at upload (recomputed by the engine when empty);
    ``architecture``: required for ``safetensors`` (a built-in family dict with
    explicit dims, e.g. ``{"family": "mlp", "in_features": 64, "hidden": [256],
    "out_features": 10}``), ignored otherwise.
    """

    path: Path
    format: str
    task: str = "classification"
    sha256: str = ""
    architecture: dict[str, Any] | None = None


@dataclass(frozen=True)
class DatasetSource:
    """A dataset file on local disk.

    ``format``: ``"npz" | "pt" | "csv" | "parquet" | "image_folder"``.
    ``inputs`` names the arrays fed to the model, in the model's positional
    order (ONNX teachers match them to session input names). Held-out arrays,
    when present, are named ``<input>_val`` (``x_val`` for the single input
    ``x``) and ``y_val``. ``options`` are per-format: csv/parquet
    ``{"label_column": "target"}``; image_folder ``{"image_size": [32, 32],
    "grayscale": false, "normalize": "dataset" | "none" | "imagenet"}``.
    """

    path: Path
    format: str = "npz"
    sha256: str = ""
    inputs: tuple[str, ...] = ("x",)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSource:
    """An uploaded trainable model used as the student (``student: {"model_id": ...}``).

    ``format``: ``"torchscript" | "torch_export" | "safetensors"`` (+ ``architecture``).
    """

    path: Path
    format: str
    architecture: dict[str, Any] | None = None
    sha256: str = ""


@dataclass(frozen=True)
class InputInfo:
    """One model input as the data shows it (what student families size themselves on).

    ``row_shape``: per-example shape, e.g. ``(64,)``, ``(1, 8, 8)`` or ``(16,)`` token ids;
    ``is_integer``: integer dtype (token ids, masks) - kept int64, never cast to float;
    ``max_value``: the largest value seen for integer inputs (vocab size - 1), else None.
    """

    name: str
    row_shape: tuple[int, ...]
    is_integer: bool = False
    max_value: int | None = None


@dataclass(frozen=True)
class TeacherInfo:
    """What a student family may use from the teacher (``init: teacher``, ``derive``).

    ``module``: the teacher as a torch ``nn.Module`` / ScriptModule (None for ONNX);
    ``architecture``: the teacher's architecture dict when known (safetensors);
    ``format``: the teacher's file format; ``task``: its task.
    """

    module: Any
    architecture: dict[str, Any] | None
    format: str
    task: str = "classification"


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

    ``kind``: "student" | "report" | "architecture" | "model_card" | "plot";
    ``format``: "torchscript" | "onnx" | "safetensors" | "json" | "markdown" | "png";
    ``step_index``: the step that produced it (None for the report).
    """

    kind: str
    format: str
    path: Path
    step_index: int | None
    media_type: str


@dataclass
class EngineResult:
    """What :func:`engine.run` returns on success."""

    artifacts: list[ArtifactFile]
    metrics: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
