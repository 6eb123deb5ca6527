"""The engine's errors: a failure the user can act on, one class per stable ``code``.

The supervisor copies ``code`` and ``message`` into the job's ``error``; every code is documented in
``docs/errors.md`` (``tests/engine/test_errors.py`` keeps the classes, the raise sites and the docs in
step). Raise the subclass (``InvalidDataset("array 'x' ...")``); ``EngineError.of(code, message)``
re-raises a caught error with a new message under the same class.
"""

from __future__ import annotations

from engine.values import EngineResult


class EngineError(Exception):
    """Base of the engine's errors; ``code`` names the class, ``message`` says what to do."""

    code = "engine_error"

    def __init__(self, *args: str):
        # ``EngineError(code, message)`` (the generic form) or ``Subclass(message)``.
        if type(self) is EngineError:
            code, message = args
        else:
            code, (message,) = type(self).code, args
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @staticmethod
    def of(code: str, message: str) -> EngineError:
        """An error of the class registered for ``code`` (e.g. to re-raise with the dataset's name prefixed)."""
        cls = _BY_CODE.get(code)
        return cls(message) if cls is not None and cls not in (Cancelled, QualityGateFailed) else \
            EngineError(code, message)


class InvalidModel(EngineError):
    """The teacher (or an uploaded student) file cannot be loaded or run."""

    code = "invalid_model"


class InvalidDataset(EngineError):
    """The dataset file or one of its arrays is unusable."""

    code = "invalid_dataset"


class ShapeMismatch(EngineError):
    """Dataset and teacher (or student) do not fit together."""

    code = "shape_mismatch"


class InvalidSpec(EngineError):
    """The job spec is malformed, or breaks a rule against the teacher's and datasets' facts."""

    code = "invalid_spec"


class Unsupported(EngineError):
    """Well-formed but not implemented for these inputs (format, task, device, layer type)."""

    code = "unsupported"


class ExportFailed(EngineError):
    """An export could not be produced or failed its verification."""

    code = "export_failed"


class TrainingDiverged(EngineError):
    """The training loss became NaN or infinite (lower the learning rate, clip gradients)."""

    code = "training_diverged"


class Cancelled(EngineError):
    """Raised when ``reporter.should_stop()`` returned True."""

    code = "cancelled"

    def __init__(self, message: str = "job cancelled by request"):
        super().__init__(message)


class QualityGateFailed(EngineError):
    """A step broke its ``gate`` (code ``quality_gate``).

    ``result`` is an :class:`EngineResult` holding the exports of the last step that passed (none
    when the first step failed), the report (``report["gate"] = {"failed_step", "metric", "drop",
    "max_drop"}``, with the rows of every step run including the failing one), the model card and the
    plots. The worker stores ``result.artifacts`` and fails the job with this code.
    """

    code = "quality_gate"

    def __init__(self, message: str, result: EngineResult | None = None):
        super().__init__(message)
        self.result = result if result is not None else EngineResult(artifacts=[], metrics={}, report={})


ERROR_CLASSES: tuple[type[EngineError], ...] = (InvalidModel, InvalidDataset, ShapeMismatch, InvalidSpec, Unsupported,
                                                ExportFailed, TrainingDiverged, Cancelled, QualityGateFailed)
_BY_CODE = {cls.code: cls for cls in ERROR_CLASSES}
#: Every code an engine error may carry. The worker copies it into the job's ``error.code``.
ERROR_CODES = tuple(_BY_CODE)


def error_summary(exc: BaseException, limit: int = 400) -> str:
    """One line describing an exception from torch/onnx/onnxruntime.

    TorchScript errors carry a multi-line interpreter traceback whose last line
    is the actual reason, so that line is kept.
    """
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    if not text:
        text = type(exc).__name__
    elif "Error" not in text.split(":", 1)[0]:
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
