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

from engine import registry
from engine.errors import EngineError

DEFAULT_EXPORTS = ("torchscript", "onnx", "safetensors")


@dataclass
class JobSpec:
    student: Any  # a students-registry instance, a derived student, an UploadedStudentRef, or None (the teacher)
    steps: list[Any]  # steps-registry instances
    val_fraction: float
    exports: list[str]
    seed: int
    dataset_id: str | None = None
    eval_dataset_id: str | None = None
    input_spec: dict[str, Any] | None = None
    baseline: bool = False


def _invalid(message: str) -> EngineError:
    return EngineError("invalid_spec", message)


def parse_spec(spec: Mapping[str, Any]) -> JobSpec:
    if not isinstance(spec, Mapping):
        raise _invalid(f"spec must be an object, got {type(spec).__name__}")

    from engine.students import families as _students

    raw_steps = spec.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise _invalid("steps: expected a non-empty array of steps")
    steps = [registry.steps.build(s, where=f"steps[{i}]") for i, s in enumerate(raw_steps)]

    raw_student = spec.get("student")
    if raw_student is None and all(getattr(s, "name", "") != "distill" for s in steps):
        student = None  # prune / quantize steps compress the teacher itself
    else:
        raw_student = raw_student or {"family": "mlp"}
        parse = getattr(_students, "parse_student", None)
        student = (parse(raw_student, where="student") if parse
                   else registry.students.build(raw_student, where="student"))

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

    def opt_id(key: str) -> str | None:
        value = spec.get(key)
        if value is not None and not isinstance(value, str):
            raise _invalid(f"{key}: expected a string, got {value!r}")
        return value

    input_spec = spec.get("input_spec")
    if input_spec is not None:
        if not isinstance(input_spec, Mapping):
            raise _invalid("input_spec: expected an object")
        shape = input_spec.get("shape")
        if (not isinstance(shape, list) or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise _invalid(f"input_spec.shape: expected a non-empty array of positive integers, got {shape!r}")
        rng = input_spec.get("range", [0.0, 1.0])
        if (not isinstance(rng, (list, tuple)) or len(rng) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng) or rng[0] >= rng[1]):
            raise _invalid(f"input_spec.range: expected [low, high] with low < high, got {rng!r}")
        input_spec = {"shape": [int(d) for d in shape], "range": [float(rng[0]), float(rng[1])]}
    baseline = spec.get("baseline", False)
    if not isinstance(baseline, bool):
        raise _invalid(f"baseline: expected a boolean, got {baseline!r}")

    job = JobSpec(student, steps, float(val_fraction), exports, seed, opt_id("dataset_id"), opt_id("eval_dataset_id"),
                  input_spec, baseline)
    kinds = [getattr(s, "name", "") for s in job.steps]
    for i, step in enumerate(job.steps):
        synth = getattr(step, "synthesize", None)
        if synth is not None and input_spec is None:
            raise _invalid(f"steps[{i}].synthesize needs 'input_spec' (the teacher's input shape)")
        if "quantize" in kinds[:i] and kinds[i] != "quantize":
            raise _invalid(f"steps[{i}]: a quantized model cannot be trained or pruned further "
                           "(put quantize last, or use method 'qat')")
        if getattr(step, "input_reduction", None) is not None:
            if i != 0:
                raise _invalid(f"steps[{i}].input_reduction: only the first step can reduce the inputs "
                               "(it builds the student for the reduced features)")
            if getattr(step, "synthesize", None) is not None:
                raise _invalid(f"steps[{i}].input_reduction cannot be combined with synthesize")
    if kinds.count("quantize") > 1:
        raise _invalid("steps: quantize at most once per job")
    if baseline and any(k != "distill" for k in kinds):
        raise _invalid("baseline: only for jobs whose steps are all 'distill'")
    return job
