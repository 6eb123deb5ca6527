"""Phase 1, ``validate``: cheap checks that catch every mismatch before anything expensive runs.

:func:`validate` parses the spec, resolves the device, loads every dataset the job names and
the teacher, runs the teacher on 2 rows of each dataset, and checks task / loss / metric / label
compatibility. It returns a :class:`Validated` (everything later phases need) or raises
:class:`EngineError` (``invalid_spec``, ``invalid_dataset``, ``invalid_model``,
``shape_mismatch``, ``unsupported``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import jobspec
from engine.devices import cpu_threads
from engine.data.dataset import Dataset, check_label_range
from engine.data.loading import load_dataset
from engine.pipeline.job import JobPlan, plan_job
from engine.teachers.loading import Teacher, load_teacher, probe_teacher
from jobspec.base import TASKS
from engine.values import DatasetSource, Reporter, TeacherSource
from engine.errors import EngineError, InvalidDataset, InvalidSpec, ShapeMismatch, Unsupported

DEFAULT_DATASET_KEY = "dataset"


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise Unsupported(f"device {device!r} requested but CUDA is not available")
        return torch.device(device)
    raise InvalidSpec(f"unknown device {device!r} (expected 'auto', 'cpu' or 'cuda')")


def first_rows(arrays: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
    """The first (up to) ``n`` rows of every array."""
    return {k: np.asarray(v[: min(n, v.shape[0])]) for k, v in arrays.items()}


@dataclass
class Validated:
    """What :func:`validate` established: the parsed job, device, loaded datasets (by id) and their
    sources, the bound teacher, its output width ``out_dim`` and ``task``, the input names in order
    and each input's per-row shape."""

    job: JobPlan
    device: torch.device
    datasets: dict[str, Dataset]
    sources: dict[str, DatasetSource]
    teacher: Teacher
    out_dim: int
    task: str
    inputs: list[str]
    row_shapes: dict[str, tuple[int, ...]]
    notes: dict[str, Any] = field(default_factory=dict)


def dataset_map(job: JobPlan, datasets: Any) -> dict[str, DatasetSource]:
    """``run()``'s ``datasets`` argument as ``{id: source}`` (a bare source is the job's dataset)."""
    if datasets is None:
        return {}
    if isinstance(datasets, DatasetSource):
        return {job.dataset_id or DEFAULT_DATASET_KEY: datasets}
    if not isinstance(datasets, Mapping):
        raise InvalidSpec(f"datasets must be a mapping of id -> DatasetSource, got {type(datasets).__name__}")
    return dict(datasets)


def step_dataset_id(job: JobPlan, step: Any) -> str | None:
    """The dataset a step trains on (its own, else the job's); None for a data-free step."""
    if step.synthesize is not None:
        return None
    return step.dataset_id or job.dataset_id


def _needed_datasets(job: JobPlan, sources: Mapping[str, DatasetSource]) -> list[str]:
    """The ids of every dataset the job reads, the job's own first; each must have been provided."""
    needed = [d for d in (step_dataset_id(job, step) for step in job.steps) if d is not None]
    if job.eval_dataset_id:
        needed.append(job.eval_dataset_id)
    if job.dataset_id and job.dataset_id in sources:
        needed.insert(0, job.dataset_id)
    needed = list(dict.fromkeys(needed))
    missing = [d for d in needed if d not in sources]
    if missing:
        raise InvalidSpec(f"dataset {missing[0]!r} is named by the spec but was not provided "
                          f"(provided: {', '.join(sources) or 'none'})")
    return needed


def _load_datasets(needed: list[str], sources: Mapping[str, DatasetSource], cache_dir: Path) -> dict[str, Dataset]:
    loaded: dict[str, Dataset] = {}
    for ds_id in needed:
        try:
            loaded[ds_id] = load_dataset(sources[ds_id], cache_dir)
        except EngineError as exc:
            if len(needed) > 1:
                raise EngineError.of(exc.code, f"dataset {ds_id!r}: {exc.message}") from None
            raise
    return loaded


def _inputs_and_width(job: JobPlan, loaded: Mapping[str, Dataset], teacher: Teacher
                      ) -> tuple[list[str], dict[str, tuple[int, ...]], int]:
    """The input names, their per-row shapes and the teacher's output width; every dataset must feed the
    same inputs, and a data-free job's ``input_spec`` must match the data when there is some."""
    inputs: list[str] | None = None
    row_shapes: dict[str, tuple[int, ...]] = {}
    out_dim: int | None = None
    for ds_id, ds in loaded.items():
        if inputs is None:
            inputs, row_shapes = list(ds.inputs), ds.row_shapes()
        elif list(ds.inputs) != inputs or ds.row_shapes() != row_shapes:
            raise ShapeMismatch(f"dataset {ds_id!r} has inputs {_shapes(ds.row_shapes())} but the job's first "
                                f"dataset has {_shapes(row_shapes)}")
        width = probe_teacher(teacher, first_rows(ds.x, 2))
        if out_dim is not None and width != out_dim:
            raise ShapeMismatch(f"teacher output width differs between datasets ({out_dim} vs {width})")
        out_dim = width
    shape = job.input_spec
    if inputs is None:  # data-free only: the spec's input shape (guaranteed by the spec for synthesize)
        assert shape is not None
        inputs, row_shapes = ["x"], {"x": tuple(shape.shape)}
        lo, hi = shape.range
        out_dim = probe_teacher(teacher, {"x": np.full((2, *row_shapes["x"]), (lo + hi) / 2, dtype=np.float32)})
    elif shape is not None and any(s.synthesize is not None for s in job.steps):
        if len(inputs) != 1 or tuple(shape.shape) != row_shapes[inputs[0]]:
            raise ShapeMismatch(f"input_spec.shape {shape.shape} does not match the data's rows "
                                f"{[list(v) for v in row_shapes.values()]}")
    assert out_dim is not None
    return inputs, row_shapes, out_dim


def _shapes(row_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list[int]]:
    return {k: list(v) for k, v in row_shapes.items()}


def _check_labels(loaded: Mapping[str, Dataset], task: str, out_dim: int) -> None:
    """Class ids within the teacher's classes; regression targets as wide as its outputs (cast to float32)."""
    for ds_id, ds in loaded.items():
        where = f"dataset {ds_id!r}: " if len(loaded) > 1 else ""
        try:
            if task == "classification":
                check_label_range(ds, out_dim)
            elif task == "regression":
                for key, y in (("y", ds.y), ("y_val", ds.y_val)):
                    if y is not None and (1 if y.ndim == 1 else y.shape[1]) != out_dim:
                        raise InvalidDataset(f"array {key!r} has {1 if y.ndim == 1 else y.shape[1]} target(s) per "
                                             f"row but the teacher predicts {out_dim}")
                ds.y = ds.y.astype(np.float32) if ds.y is not None else None
                ds.y_val = ds.y_val.astype(np.float32) if ds.y_val is not None else None
        except EngineError as exc:
            raise EngineError.of(exc.code, where + exc.message) from None


def _auto_threads(job: Any, teacher: TeacherSource) -> int:
    """Threads for a CPU job the deployment sets none for: sized by the teacher's file (≈ 4 bytes a weight)
    and the largest batch (:func:`engine.devices.cpu_threads`)."""
    try:
        weights = Path(teacher.path).stat().st_size // 4
    except OSError:
        weights = 0
    batch = max((getattr(step, "batch_size", 0) or 0 for step in job.steps), default=0) or 128
    return cpu_threads(weights, batch)


def validate(spec: Mapping[str, Any], teacher: TeacherSource, datasets: Any, reporter: Reporter,
             device: str, threads: int | None, out_dir: Path) -> Validated:
    """Cheap checks that catch every mismatch before anything expensive runs: the spec (its models and
    rules), the device, the datasets it names, the teacher against the data, the labels against the task."""
    reporter.event("validate", "checking spec, datasets and teacher")
    job = plan_job(spec)
    dev = resolve_device(device)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")  # the worker's setting
    elif dev.type == "cpu":
        threads = _auto_threads(job, teacher)
    if threads is not None:
        torch.set_num_threads(threads)
    task = teacher.task
    if task not in TASKS:
        raise Unsupported(f"teacher task {task!r} is not supported ({', '.join(TASKS)})")
    sources = dataset_map(job, datasets)
    loaded = _load_datasets(_needed_datasets(job, sources), sources, Path(out_dir) / "cache")
    tch = load_teacher(teacher, dev, threads)
    # the spec's rules against what the files are (the API checked the same from their metadata)
    facts = jobspec.Facts(task=task, teacher_format=teacher.format,
                          labelled={ds_id: ds.y is not None for ds_id, ds in loaded.items()})
    for problem in jobspec.conflicts(job.spec, facts):
        raise (Unsupported if problem.unsupported else InvalidSpec)(str(problem))
    inputs, row_shapes, out_dim = _inputs_and_width(job, loaded, tch)
    tch.bind(inputs)
    _check_labels(loaded, task, out_dim)
    primary = loaded.get(job.dataset_id or "") or (next(iter(loaded.values())) if loaded else None)
    reporter.event(
        "validate",
        f"datasets and teacher are compatible: task {task}, inputs "
        + ", ".join(f"{k} {list(v)}" for k, v in row_shapes.items()) + f", teacher output width {out_dim}"
        + (f", {primary.num_rows} rows, {'labelled' if primary.y is not None else 'unlabelled'}" if primary else
           ", data-free"),
        data={
            "task": task,
            "datasets": {k: {"rows": v.num_rows, "labelled": v.y is not None, "has_val": v.x_val is not None}
                         for k, v in loaded.items()},
            "inputs": _shapes(row_shapes),
            "output_width": out_dim,
            "num_classes": out_dim if task == "classification" else None,
            "rows": primary.num_rows if primary else 0,
            "row_shape": list(row_shapes[inputs[0]]),
            "labelled": bool(primary is not None and primary.y is not None),
            "has_x_val": bool(primary is not None and primary.x_val is not None),
        },
    )
    return Validated(job, dev, loaded, sources, tch, out_dim, task, inputs, row_shapes)
