"""The engine's errors: a failure the user can act on, with a stable ``code``.

The supervisor copies ``code`` and ``message`` into the job's ``error``; every code is documented in
``docs/errors.md`` (``tests/engine/test_errors.py`` keeps the two in step).
"""

from __future__ import annotations

from engine.values import EngineResult

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
    "quality_gate",  # a step's output lost more quality than its ``gate`` allows
)


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


class QualityGateFailed(EngineError):
    """A step broke its ``gate`` (code ``quality_gate``).

    ``result`` is an :class:`EngineResult` holding the exports of the last step that passed (none
    when the first step failed), the report (``report["gate"] = {"failed_step", "metric", "drop",
    "max_drop"}``, with the rows of every step run including the failing one), the model card and the
    plots. The worker stores ``result.artifacts`` and fails the job with this code.
    """

    def __init__(self, message: str, result: EngineResult | None = None):
        super().__init__("quality_gate", message)
        self.result = result if result is not None else EngineResult(artifacts=[], metrics={}, report={})


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
