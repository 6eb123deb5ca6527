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

from engine.data.dataset import Dataset, check_label_range
from engine.data.loading import load_dataset
from engine.pipeline.spec import JobSpec, parse_spec
from engine.teachers.loading import Teacher, load_teacher, probe_teacher
from engine.values import TASKS, DatasetSource, Reporter, TeacherSource
from engine.errors import EngineError

DEFAULT_DATASET_KEY = "dataset"


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise EngineError("unsupported", f"device {device!r} requested but CUDA is not available")
        return torch.device(device)
    raise EngineError("invalid_spec", f"unknown device {device!r} (expected 'auto', 'cpu' or 'cuda')")


def first_rows(arrays: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
    """The first (up to) ``n`` rows of every array."""
    return {k: np.asarray(v[: min(n, v.shape[0])]) for k, v in arrays.items()}


@dataclass
class Validated:
    """What :func:`validate` established: the parsed job, device, loaded datasets (by id) and their
    sources, the bound teacher, its output width ``out_dim`` and ``task``, the input names in order
    and each input's per-row shape."""

    job: JobSpec
    device: torch.device
    datasets: dict[str, Dataset]
    sources: dict[str, DatasetSource]
    teacher: Teacher
    out_dim: int
    task: str
    inputs: list[str]
    row_shapes: dict[str, tuple[int, ...]]
    notes: dict[str, Any] = field(default_factory=dict)


def dataset_map(job: JobSpec, datasets: Any) -> dict[str, DatasetSource]:
    """``run()``'s ``datasets`` argument as ``{id: source}`` (a bare source becomes the job's dataset)."""
    if datasets is None:
        return {}
    if isinstance(datasets, DatasetSource):
        key = job.dataset_id or DEFAULT_DATASET_KEY
        if job.dataset_id is None:
            job.dataset_id = key
        return {key: datasets}
    if not isinstance(datasets, Mapping):
        raise EngineError("invalid_spec", f"datasets must be a mapping of id -> DatasetSource, got {type(datasets).__name__}")
    return dict(datasets)


def step_dataset_id(job: JobSpec, step: Any) -> str | None:
    """The dataset a step trains on (its own, else the job's); None for a data-free step."""
    if getattr(step, "synthesize", None) is not None:
        return None
    return getattr(step, "dataset_id", None) or job.dataset_id


def validate(spec: Mapping[str, Any], teacher: TeacherSource, datasets: Any, reporter: Reporter,
              device: str, threads: int | None, out_dir: Path) -> Validated:
    """Cheap checks that catch every mismatch before anything expensive runs."""
    reporter.event("validate", "checking spec, datasets and teacher")
    job = parse_spec(spec)
    dev = resolve_device(device)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise EngineError("invalid_spec", f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    sources = dataset_map(job, datasets)
    task = getattr(teacher, "task", "classification")
    if task not in TASKS:
        raise EngineError("unsupported", f"teacher task {task!r} is not supported ({', '.join(TASKS)})")

    # which datasets the job needs
    needed: list[str] = []
    for i, step in enumerate(job.steps):
        ds_id = step_dataset_id(job, step)
        if ds_id is None and getattr(step, "synthesize", None) is None:
            raise EngineError("invalid_spec", f"steps[{i}] has no data: give 'dataset_id' (job or step) or 'synthesize'")
        if ds_id is not None:
            needed.append(ds_id)
    if job.eval_dataset_id:
        needed.append(job.eval_dataset_id)
    if job.dataset_id and job.dataset_id in sources:
        needed.insert(0, job.dataset_id)
    needed = list(dict.fromkeys(needed))
    missing = [d for d in needed if d not in sources]
    if missing:
        raise EngineError("invalid_spec", f"dataset {missing[0]!r} is named by the spec but was not provided "
                          f"(provided: {', '.join(sources) or 'none'})")

    # per-step static checks
    for i, step in enumerate(job.steps):
        loss = getattr(step, "loss", None)
        if loss is None and getattr(step, "finetune", None) is not None:
            loss = step.finetune.loss
        tasks = getattr(loss, "tasks", None) if loss is not None else None
        if tasks is not None and task not in tasks:
            suggestion = {"classification": "kd, soft_ce, hard or mse", "regression": "mse",
                          "embedding": "cosine or mse"}.get(task, "")
            raise EngineError("invalid_spec", f"steps[{i}].loss: {loss.name!r} works for "
                              f"{' / '.join(sorted(tasks))} teachers, but this teacher's task is {task!r}"
                              + (f" (use {suggestion})" if suggestion else ""))
        es = getattr(step, "early_stopping", None)
        if es is not None:
            ok = {"auto": True, "loss": True, "agreement": task == "classification",
                  "accuracy": task == "classification", "mse": task in ("regression", "embedding"),
                  "cosine": task == "embedding"}[es.metric]
            if not ok:
                raise EngineError("invalid_spec", f"steps[{i}].early_stopping.metric: {es.metric!r} does not apply "
                                  f"to a {task} teacher")
        gate = getattr(step, "gate", None)
        if gate is not None:
            fits = {"accuracy": task == "classification", "agreement": task == "classification",
                    "f1_macro": task == "classification", "r2": task == "regression",
                    "cosine": task == "embedding"}[gate.metric]
            if not fits:
                raise EngineError("invalid_spec", f"steps[{i}].gate.metric: {gate.metric!r} does not apply to a "
                                  f"{task} teacher")
        if getattr(step, "synthesize", None) is not None and task != "classification":
            raise EngineError("invalid_spec", f"steps[{i}].synthesize: data-free distillation needs a "
                              f"classification teacher (this one is {task!r})")

    cache_dir = Path(out_dir) / "cache"
    loaded: dict[str, Dataset] = {}
    for ds_id in needed:
        try:
            loaded[ds_id] = load_dataset(sources[ds_id], cache_dir)
        except EngineError as exc:
            if len(needed) > 1:
                raise EngineError(exc.code, f"dataset {ds_id!r}: {exc.message}") from None
            raise
    tch = load_teacher(teacher, dev, threads)
    if any(getattr(s, "synthesize", None) is not None for s in job.steps) and tch.module is None:
        raise EngineError("invalid_spec", "data-free distillation needs a torch teacher "
                          "(TorchScript, torch.export or safetensors)")

    # inputs: every dataset must feed the same inputs
    inputs: list[str] | None = None
    row_shapes: dict[str, tuple[int, ...]] = {}
    out_dim: int | None = None
    for ds_id, ds in loaded.items():
        if inputs is None:
            inputs, row_shapes = list(ds.inputs), ds.row_shapes()
        elif list(ds.inputs) != inputs or ds.row_shapes() != row_shapes:
            raise EngineError("shape_mismatch", f"dataset {ds_id!r} has inputs "
                              f"{ {k: list(v) for k, v in ds.row_shapes().items()} } but the job's first dataset has "
                              f"{ {k: list(v) for k, v in row_shapes.items()} }")
        width = probe_teacher(tch, first_rows(ds.x, 2))
        if out_dim is not None and width != out_dim:
            raise EngineError("shape_mismatch", f"teacher output width differs between datasets ({out_dim} vs {width})")
        out_dim = width
    if inputs is None:  # data-free only
        assert job.input_spec is not None
        inputs = ["x"]
        row_shapes = {"x": tuple(job.input_spec["shape"])}
        lo, hi = job.input_spec["range"]
        probe = {"x": np.full((2, *row_shapes["x"]), (lo + hi) / 2, dtype=np.float32)}
        out_dim = probe_teacher(tch, probe)
    elif job.input_spec is not None and any(getattr(s, "synthesize", None) is not None for s in job.steps):
        if len(inputs) != 1 or tuple(job.input_spec["shape"]) != row_shapes[inputs[0]]:
            raise EngineError("shape_mismatch", f"input_spec.shape {job.input_spec['shape']} does not match the "
                              f"data's rows {[list(v) for v in row_shapes.values()]}")
    assert out_dim is not None
    tch.bind(inputs)

    # labels vs task
    for ds_id, ds in loaded.items():
        where = f"dataset {ds_id!r}: " if len(loaded) > 1 else ""
        try:
            if task == "classification":
                check_label_range(ds, out_dim)
            elif task == "regression":
                for key, y in (("y", ds.y), ("y_val", ds.y_val)):
                    if y is None:
                        continue
                    width = 1 if y.ndim == 1 else y.shape[1]
                    if width != out_dim:
                        raise EngineError("invalid_dataset", f"array {key!r} has {width} target(s) per row but "
                                          f"the teacher predicts {out_dim}")
                    ds.y = ds.y.astype(np.float32) if ds.y is not None else None
                    ds.y_val = ds.y_val.astype(np.float32) if ds.y_val is not None else None
        except EngineError as exc:
            raise EngineError(exc.code, where + exc.message) from None
    if job.baseline:
        if task == "embedding":
            raise EngineError("invalid_spec", "baseline: an embedding teacher has no labels to train a baseline on")
        for i, step in enumerate(job.steps):
            ds_id = step_dataset_id(job, step)
            if ds_id is None:
                raise EngineError("invalid_spec", f"baseline needs labelled data, but steps[{i}] is data-free")
            if loaded[ds_id].y is None:
                raise EngineError("invalid_spec", f"baseline needs labels, but dataset {ds_id!r} "
                                  f"(steps[{i}]) has none")

    primary = loaded.get(job.dataset_id or "") or (next(iter(loaded.values())) if loaded else None)
    for i, step in enumerate(job.steps):
        gate = getattr(step, "gate", None)
        if gate is not None and gate.metric in ("accuracy", "f1_macro", "r2") and (primary is None or primary.y is None):
            raise EngineError("invalid_spec", f"steps[{i}].gate.metric: {gate.metric!r} needs labels in the "
                              "dataset (use 'agreement' for unlabelled data)")
    if job.student is None and tch.module is None:
        for i, step in enumerate(job.steps):
            if not (step.name == "quantize" and step.method == "onnx_int8"):
                raise EngineError("unsupported", f"steps[{i}] ({step.name} {step.method}) needs a torch model, but the "
                                  f"job has no student and the teacher is ONNX; only 'quantize' with method "
                                  "'onnx_int8' works directly on an ONNX teacher (or add a student and a distill step)")
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
            "inputs": {k: list(v) for k, v in row_shapes.items()},
            "output_width": out_dim,
            "num_classes": out_dim if task == "classification" else None,
            # kept for older readers
            "rows": primary.num_rows if primary else 0,
            "row_shape": list(row_shapes[inputs[0]]),
            "labelled": bool(primary is not None and primary.y is not None),
            "has_x_val": bool(primary is not None and primary.x_val is not None),
        },
    )
    return Validated(job, dev, loaded, sources, tch, out_dim, task, inputs, row_shapes)
