"""Build a student the way a job does: the spec's student config, validated, then its engine builder."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from engine.students.builder import student_builder
from jobspec.students import Student

_STUDENT = TypeAdapter(Student)


def build_student(config: dict[str, Any]) -> Any:
    """``{"family": "mlp", ...}`` or ``{"derive": {...}}`` → the builder with ``.create(inputs, out, teacher)``."""
    return student_builder(_STUDENT.validate_python(config))
