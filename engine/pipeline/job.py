"""The job the engine runs: the stored spec validated by the spec's own models, its steps and student built.

``plan_job(spec_json) -> JobPlan``. Validation is :class:`jobspec.JobSpec`'s — the same model the API
validated the request with — so a spec the API accepted is accepted here; anything else (a spec edited
in the database, a newer API) fails fast with :class:`InvalidSpec` naming every bad field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

import jobspec
import jobspec.base
from engine.errors import InvalidSpec
from engine.losses import outputs as _losses  # noqa: F401  (registers the losses)
from engine.steps import kinds as _step_kinds  # noqa: F401  (registers the step kinds)
from engine.students import families as _families  # noqa: F401  (registers the student families)
from engine.training import optim as _optimizers  # noqa: F401  (registers the optimizers)
from engine.registry import steps as step_registry
from engine.students.builder import student_builder


@dataclass(frozen=True)
class JobPlan:
    """``spec``: the validated spec; ``steps``: the step-kind instances in order; ``student``: a builder
    (``.create(inputs, out_dim, teacher)``), the :class:`jobspec.UploadedStudent` to load, or ``None`` when
    prune/quantize steps work on the teacher itself."""

    spec: jobspec.JobSpec
    steps: list[Any]
    student: Any

    @property
    def uploaded_student(self) -> jobspec.UploadedStudent | None:
        return self.student if isinstance(self.student, jobspec.UploadedStudent) else None

    # The spec's top-level fields, read everywhere in the pipeline.
    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def exports(self) -> list[str]:
        return list(self.spec.exports)

    @property
    def val_fraction(self) -> float:
        return self.spec.val_fraction

    @property
    def dataset_id(self) -> str | None:
        return self.spec.dataset_id

    @property
    def eval_dataset_id(self) -> str | None:
        return self.spec.eval_dataset_id

    @property
    def input_spec(self) -> jobspec.InputSpec | None:
        return self.spec.input_spec

    @property
    def baseline(self) -> bool:
        return self.spec.baseline

    def step_dataset_id(self, index: int) -> str | None:
        return self.spec.step_dataset_id(index)


def plan_job(spec: Mapping[str, Any]) -> JobPlan:
    """Validate the stored spec and build its components; :class:`InvalidSpec` on any problem."""
    try:
        parsed = jobspec.JobSpec.model_validate(spec)
    except ValidationError as exc:
        raise InvalidSpec(jobspec.base.validation_message(exc)) from None
    steps = [step_registry.build(step) for step in parsed.steps]
    if parsed.student is None or isinstance(parsed.student, jobspec.UploadedStudent):
        student: Any = parsed.student
    else:
        student = student_builder(parsed.student)
    return JobPlan(parsed, steps, student)
