"""The student a job's spec asks for, as a builder: ``builder.create(inputs, out_dim, teacher)`` returns
``(module, architecture)``. Uploaded students (``model_id``) are files, loaded by the pipeline instead."""

from __future__ import annotations

from typing import Any

import jobspec
from engine.registry import students
from engine.students.derive import DerivedStudent


def student_builder(config: jobspec.MLPStudent | jobspec.CNNStudent | jobspec.ResNetStudent
                    | jobspec.EmbeddingBagStudent | jobspec.TextTransformerStudent | jobspec.DerivedStudent) -> Any:
    """A registered family (``students.build``) or the derived-student builder, by the config's type."""
    if isinstance(config, jobspec.DerivedStudent):
        return DerivedStudent(config)
    return students.build(config)
