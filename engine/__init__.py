"""Distillery's pure-PyTorch distillation engine.

Public interface (used by the worker)::

    from engine import run, inspect_model, registries
    from engine import TeacherSource, DatasetSource, Reporter
    from engine import ArtifactFile, EngineResult, EngineError, Cancelled, QualityGateFailed
    from engine import has_checkpoint  # run(..., checkpoint_dir=...) resumes from it

The value types are stdlib-only and imported eagerly; ``run``, ``registries``
and ``inspect_model`` are resolved lazily (PEP 562) so that importing the
package - e.g. for ``python -m engine.inspection.model`` on an ONNX upload - does
not pay for importing torch.

Layer rule: this package imports only torch, numpy, onnx, onnxruntime,
safetensors and the standard library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.values import (
    ArtifactFile,
    DatasetSource,
    EngineResult,
    InputInfo,
    ModelSource,
    NullReporter,
    Reporter,
    TeacherInfo,
    TeacherSource,
)
from engine.errors import Cancelled, EngineError, QualityGateFailed

if TYPE_CHECKING:
    from engine.training.checkpoint import has_checkpoint
    from engine.inspection.model import inspect_model
    from engine.pipeline.run import run
    from engine.registry import registries

__all__ = [
    "run",
    "TeacherSource",
    "DatasetSource",
    "ModelSource",
    "InputInfo",
    "TeacherInfo",
    "Reporter",
    "NullReporter",
    "ArtifactFile",
    "EngineResult",
    "EngineError",
    "Cancelled",
    "QualityGateFailed",
    "registries",
    "inspect_model",
    "has_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name == "run":
        from engine.pipeline.run import run

        return run
    if name == "registries":
        from engine.pipeline import run as pipeline  # noqa: F401  (imports every plugin module so registries are full)
        from engine.registry import registries

        return registries
    if name == "has_checkpoint":
        from engine.training.checkpoint import has_checkpoint

        return has_checkpoint
    if name == "inspect_model":
        from engine.inspection.model import inspect_model

        return inspect_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
