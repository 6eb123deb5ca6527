"""Teacher models behind one interface (registry ``teacher_formats``).

``load_teacher(source, device)`` returns a :class:`Teacher`. Formats:

* ``torchscript``: ``torch.jit.load``
* ``onnx``: onnxruntime session (several named inputs matched to dataset arrays by name)
* ``torch_export``: a ``.pt2`` from ``torch.export.save``, loaded by :func:`safe_load_exported`,
  which refuses every archive feature that would unpickle or run code (see there)
* ``safetensors``: weights + ``TeacherSource.architecture`` (a built-in family dict),
  built with ``students.from_architecture`` then ``load_state_dict(strict=True)``

Interface: ``teacher.bind(inputs)`` fixes the dataset input order; then
``teacher({name: tensor}) -> float32 [B, D]`` (inputs in ``inputs`` order for
torch teachers, by name for ONNX), ``teacher.features(batch, names)`` for hints,
``teacher.module`` (torch module or None for ONNX) for data-free synthesis.
Load failures are ``EngineError("invalid_model")``; inputs the teacher cannot
take and outputs that are not [B, D] are ``"shape_mismatch"``.

Where things live: the interface in :mod:`.teacher_base`, the torch formats in
:mod:`.teachers_torch`, ONNX in :mod:`.teachers_onnx`, the ``.pt2`` checks in :mod:`.pt2_safety`.
This module loads (:func:`load_teacher`), probes (:func:`probe_teacher`) and runs
(:func:`teacher_outputs`) teachers, and re-exports the names above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import InvalidModel, ShapeMismatch, Unsupported, error_summary
from engine.inspection.pt2 import check_pt2_archive, safe_load_exported
from engine.registry import teacher_formats
from engine.teachers.base import Batch, Teacher, as_outputs
from engine.teachers.onnx_runtime import OnnxTeacher  # importing the format modules registers them
from engine.teachers.torch_modules import (
    SafetensorsTeacher,
    TorchExportTeacher,
    TorchScriptTeacher,
    TorchTeacher,
    capture_features,
    last_linear_name,
    load_module,
    load_safetensors_module,
)
from jobspec.base import TASKS
from engine.values import TeacherSource
from engine.errors import Cancelled, EngineError

# Re-exported: ``teachers`` stays the one import for everything teacher-related.
__all__ = [
    "Batch", "Teacher", "as_outputs",
    "TorchTeacher", "TorchScriptTeacher", "TorchExportTeacher", "SafetensorsTeacher", "OnnxTeacher",
    "capture_features", "last_linear_name", "load_module", "load_safetensors_module",
    "check_pt2_archive", "safe_load_exported",
    "load_teacher", "probe_teacher", "teacher_outputs",
]


# ---------------------------------------------------------------------------------------------
# loading, probing, running


def load_teacher(source: TeacherSource, device: torch.device, threads: int | None = None) -> Teacher:
    task = getattr(source, "task", "classification")
    if task not in TASKS:
        raise Unsupported(f"teacher task {task!r} is not supported ({', '.join(TASKS)})")
    if source.format not in teacher_formats:
        raise Unsupported(f"teacher format {source.format!r} is not supported ({', '.join(teacher_formats.names())})",
        )
    cls = teacher_formats.get(source.format)
    return cls(Path(source.path), device, threads, task=task, architecture=getattr(source, "architecture", None))


def probe_teacher(teacher: Teacher, x: Mapping[str, np.ndarray]) -> int:
    """Bind the dataset's inputs, run the teacher on the first (up to) 2 rows; return its output width.

    Any failure to take the dataset's rows is a shape_mismatch whose message
    names both shapes and quotes the teacher's own error.
    """
    names = list(x)
    teacher.bind(names)
    row_shapes = {k: tuple(v.shape[1:]) for k, v in x.items()}
    teacher.precheck(row_shapes)
    probe = {k: torch.from_numpy(np.array(_as_model_input(v[: min(2, v.shape[0])]), copy=True)) for k, v in x.items()}
    try:
        out = teacher(probe)
    except EngineError:
        raise
    except Exception as exc:
        reason = error_summary(exc)
        first = names[0]
        row_shape = row_shapes[first]
        want = teacher.expected_features()
        have = int(math.prod(row_shape))
        if len(names) > 1:
            shapes = ", ".join(f"{k} {list(v)}" for k, v in row_shapes.items())
            msg = f"dataset inputs ({shapes}) do not fit the teacher"
        elif want is not None and want == have and len(row_shape) > 1:
            msg = (
                f"dataset input {first!r} has per-row shape {list(row_shape)} but the teacher expects "
                f"flat rows of {want} features (its first layer is Linear({want}, ...)); "
                f"reshape the array to [rows, {want}]"
            )
        elif want is not None and want != have:
            if len(row_shape) == 1:
                msg = f"dataset input {first!r} has {have} features per row but the teacher expects {want}"
            else:
                msg = (
                    f"dataset input {first!r} has per-row shape {list(row_shape)} ({have} values) "
                    f"but the teacher expects {want} features"
                )
        else:
            msg = f"dataset input {first!r} with per-row shape {list(row_shape)} does not fit the teacher"
        raise ShapeMismatch(f"{msg}: teacher raised {reason}") from None
    width = int(out.shape[1])
    if teacher.task == "classification" and width < 2:
        raise ShapeMismatch(f"teacher output has shape {list(out.shape)}: {width} value per row, but "
                            "classification needs >= 2 classes")
    return width


def _as_model_input(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64, copy=False)
    return a.astype(np.float32, copy=False)


def teacher_outputs(
    teacher: Teacher,
    x: Mapping[str, Any],
    *,
    batch_size: int = 512,
    should_stop: Callable[[], bool] | None = None,
    features: Sequence[str] = (),
    on_batch: Callable[[int, torch.Tensor, dict[str, torch.Tensor]], None] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """Teacher outputs (and hint features) for every row, batched.

    Returns ``(outputs [N, D], {feature: [N, ...]})`` on the teacher's device, or, when
    ``on_batch(start, out, feats)`` is given, streams batches to it and returns None.
    """
    n = int(next(iter(x.values())).shape[0])
    parts: list[torch.Tensor] = []
    fparts: dict[str, list[torch.Tensor]] = {f: [] for f in features}
    for start in range(0, n, batch_size):
        if should_stop is not None and should_stop():
            raise Cancelled("job cancelled while computing teacher outputs")
        batch = {k: torch.from_numpy(np.ascontiguousarray(_as_model_input(v[start:start + batch_size])))
                 for k, v in x.items()}
        try:
            out = teacher(batch)
            feats = teacher.features(batch, list(features)) if features else {}
        except EngineError:
            raise
        except Exception as exc:
            raise InvalidModel(f"teacher failed on rows {start}..{min(start + batch_size, n) - 1}: {error_summary(exc)}"
            ) from None
        if not torch.isfinite(out).all():
            raise InvalidModel("teacher produced NaN or infinite outputs")
        if on_batch is not None:
            on_batch(start, out, feats)
        else:
            parts.append(out)
            for k, v in feats.items():
                fparts[k].append(v)
    if on_batch is not None:
        return None
    return torch.cat(parts), {k: torch.cat(v) for k, v in fparts.items()}
