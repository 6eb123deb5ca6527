"""Turn the stored job spec (a JSON dict) into typed, validated objects.

Plugin configs (student, steps, losses, optimizers) are strict: unknown keys
are rejected with the full path. Unknown *top-level* keys are ignored: that
level belongs to the API (ids, metadata, future bookkeeping fields).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import registry
from .types import EngineError

DEFAULT_EXPORTS = ("torchscript", "onnx", "safetensors")


@dataclass
class JobSpec:
    student: Any  # a students-registry instance
    steps: list[Any]  # steps-registry instances
    val_fraction: float
    exports: list[str]
    seed: int


def _invalid(message: str) -> EngineError:
    return EngineError("invalid_spec", message)


def parse_spec(spec: Mapping[str, Any]) -> JobSpec:
    if not isinstance(spec, Mapping):
        raise _invalid(f"spec must be an object, got {type(spec).__name__}")

    student = registry.students.build(spec.get("student", {"family": "mlp"}), where="student")

    raw_steps = spec.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise _invalid("steps: expected a non-empty array of steps")
    steps = [registry.steps.build(s, where=f"steps[{i}]") for i, s in enumerate(raw_steps)]

    val_fraction = spec.get("val_fraction", 0.1)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not math.isfinite(val_fraction):
        raise _invalid(f"val_fraction: expected a number, got {val_fraction!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise _invalid(f"val_fraction: must be in [0, 1), got {val_fraction}")

    raw_exports = spec.get("exports", list(DEFAULT_EXPORTS))
    if not isinstance(raw_exports, list):
        raise _invalid(f"exports: expected an array, got {type(raw_exports).__name__}")
    exports: list[str] = []
    for i, name in enumerate(raw_exports):
        if not isinstance(name, str) or name not in registry.exports:
            raise _invalid(
                f"exports[{i}]: unknown export format {name!r}; available: {', '.join(registry.exports.names())}"
            )
        if name not in exports:
            exports.append(name)

    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise _invalid(f"seed: expected an integer in [0, 2^63), got {seed!r}")

    return JobSpec(student, steps, float(val_fraction), exports, seed)
