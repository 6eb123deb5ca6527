"""The job report: per-model rows, ratios and reproducibility data.

Layout (written as ``report.json``)::

    {"teacher": row, "steps": [{"index", "kind", "method", **row}], "student": row,
     "compression_ratio", "parameter_ratio", "speedup",
     "reproducibility": {"seed", "versions", "spec_sha256", "data_sha256", "teacher_sha256", ...},
     "data": {"train_rows", "val_rows", "val_source", ...}}

    row = {"num_parameters", "size_bytes", "latency_ms": {"batch_1", "batch_32"},
           task metrics: "accuracy"?, "agreement", "f1_macro"? (classification); "mse", "mae", "r2"
           (labels), "teacher_r2", "agreement_mse" (regression); "cosine", "mse" (embedding)}

    With ``baseline: true``: ``"baseline": row`` (same student trained on labels only) and
    ``"teacher_gain": {metric: distilled - baseline}``. ``"timings": {phase: seconds}``: where the
    job's wall time went (:mod:`engine.report.timings`).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from engine.report.latency import median_latency_ms
from engine.report.timings import phase
from engine.values import ArtifactFile

LATENCY_BATCHES = (1, 32)
#: A report latency is the median once it moves less than this fraction (see ``median_latency_ms``).
LATENCY_STABLE = 0.03


class LatencyMs(TypedDict):
    """Median CPU latency of one forward pass, in milliseconds, at batch 1 and batch 32."""

    batch_1: float
    batch_32: float


class ModelRow(TypedDict, total=False):
    """One model in the report (the teacher, a step's output, the student, the baseline).

    Always ``num_parameters``, ``size_bytes`` (as shipped) and ``latency_ms``; then the task's metrics
    that were measured (:data:`engine.metrics.METRIC_KEYS`) and, where known, the nonzero parameters
    and gzip size. Step rows add ``index``, ``kind``, ``method`` and what the step reports of itself.
    """

    num_parameters: int
    nonzero_parameters: int
    size_bytes: int
    size_gzip_bytes: int
    latency_ms: LatencyMs
    accuracy: float
    agreement: float
    f1_macro: float
    mse: float
    mae: float
    r2: float
    teacher_r2: float
    agreement_mse: float
    cosine: float


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def spec_sha256(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(spec).encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def latency_batch(x: Any, rows: int) -> Any:
    """The first ``rows`` rows of ``x`` (an array or a dict of arrays), repeated if it has fewer."""
    if isinstance(x, Mapping):
        return {k: latency_batch(v, rows) for k, v in x.items()}
    x = np.asarray(x[: min(rows, x.shape[0])])
    reps = math.ceil(rows / x.shape[0])
    return np.ascontiguousarray(np.concatenate([x] * reps)[:rows]) if reps > 1 else np.ascontiguousarray(x[:rows])


def measure_latency(make_fn: Callable[[Any], Callable[[], Any]], x: Any) -> LatencyMs:
    """``{"batch_1": ms, "batch_32": ms}``; ``make_fn(batch)`` returns a zero-arg runner."""
    with phase("latency"):
        return {f"batch_{b}": median_latency_ms(make_fn(latency_batch(x, b)), warmup=3, stable_within=LATENCY_STABLE)
                for b in LATENCY_BATCHES}  # type: ignore[return-value]


def model_row(num_parameters: int, size_bytes: int, latency_ms: Mapping[str, float],
              metrics: Mapping[str, float]) -> ModelRow:
    """A :class:`ModelRow` from the measured numbers; metrics outside the task's keys are dropped."""
    row: dict[str, Any] = {
        "num_parameters": int(num_parameters),
        "size_bytes": int(size_bytes),
        "latency_ms": dict(latency_ms),
    }
    from engine.metrics import METRIC_KEYS

    for key in METRIC_KEYS:
        if key in metrics:
            row[key] = float(metrics[key])
    return row  # type: ignore[return-value]


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when either is unknown (a served teacher has no size or local speed)."""
    return float(a) / float(b) if a is not None and b else None


def build_report(
    *,
    teacher: ModelRow,
    steps: list[ModelRow],
    student: ModelRow,
    reproducibility: dict,
    data: dict,
    architecture: dict | None = None,
) -> dict[str, Any]:
    """The report's layout (API.md); ``architecture`` is the delivered student's (incl. what was copied
    from the teacher under ``init_from_teacher``)."""
    return {
        "teacher": teacher,
        "steps": steps,
        "student": student,
        "compression_ratio": _ratio(teacher["size_bytes"], student["size_bytes"]),
        "parameter_ratio": _ratio(teacher["num_parameters"], student["num_parameters"]),
        "speedup": _ratio(teacher["latency_ms"]["batch_32"], student["latency_ms"]["batch_32"]),
        "reproducibility": reproducibility,
        "data": data,
        "architecture": architecture,
    }


def write_report(report: dict, out_dir: Path) -> ArtifactFile:
    path = Path(out_dir) / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False))
    return ArtifactFile("report", "json", path, None, "application/json")
