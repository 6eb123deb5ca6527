"""``run()``: one distillation job from spec to artifacts.

Phases (each announced with ``reporter.event``):

1. ``validate`` - parse the spec, load the dataset and the teacher, run the
   teacher on 2 rows and check labels. Fails in well under a second for
   mismatched inputs, before anything expensive happens.
2. ``load`` - split train/held-out rows and move them to the device.
3. ``teacher_outputs`` - run the teacher once over every row; cache logits.
4. ``step_started``/``step_finished`` - run each step on the student.
5. ``export`` - write and verify the requested student formats.
6. ``report`` - measure sizes/latencies and write ``report.json``.
"""

from __future__ import annotations

import copy
import io
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Importing the plugin modules registers them.
from . import export as export_mod
from . import losses as _losses  # noqa: F401
from . import optim as _optim  # noqa: F401
from . import steps as _steps  # noqa: F401
from . import students as _students
from .data import Dataset, Split, check_label_range, load_dataset, split_dataset
from .evaluate import classification_metrics
from .registry import exports as export_registry
from .report import build_report, file_sha256, measure_latency, model_row, spec_sha256, versions, write_report
from .spec import JobSpec, parse_spec
from .teachers import Teacher, load_teacher, probe_teacher, teacher_logits
from .train import ProgressTracker, TrainContext
from .types import ArtifactFile, DatasetSource, EngineError, EngineResult, Reporter, TeacherSource

#: Held-out rows used to verify exports (enough to catch numeric drift, cheap).
VERIFY_ROWS = 256


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise EngineError("unsupported", f"device {device!r} requested but CUDA is not available")
        return torch.device(device)
    raise EngineError("invalid_spec", f"unknown device {device!r} (expected 'auto', 'cpu' or 'cuda')")


def _student_size_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """Size of the student as a TorchScript archive (what a user would ship)."""
    try:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(export_mod.script_student(model, example), buffer)
        return buffer.tell()
    except Exception:
        return _students.state_dict_bytes(model)


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    model = model.eval()
    if next(model.parameters()).device.type == "cpu":
        return model
    return copy.deepcopy(model).cpu().eval()


def _student_latency(model: nn.Module, x: np.ndarray) -> dict[str, float]:
    cpu_model = _cpu_eval_copy(model)

    def make(batch: np.ndarray):
        t = torch.from_numpy(batch)

        def call():
            with torch.inference_mode():
                return cpu_model(t)

        return call

    return measure_latency(make, x)


@dataclass
class _Validated:
    job: JobSpec
    device: torch.device
    data: Dataset
    teacher: Teacher
    num_classes: int


def _validate(spec: Mapping[str, Any], teacher: TeacherSource, dataset: DatasetSource, reporter: Reporter,
              device: str, threads: int | None) -> _Validated:
    """Cheap checks that catch every mismatch before anything expensive runs."""
    reporter.event("validate", "checking spec, dataset and teacher")
    job = parse_spec(spec)
    dev = resolve_device(device)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise EngineError("invalid_spec", f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    data = load_dataset(dataset)
    tch = load_teacher(teacher, dev, threads)
    num_classes = probe_teacher(tch, data.input_name, data.x)
    check_label_range(data, num_classes)
    labelled = data.y is not None
    reporter.event(
        "validate",
        f"dataset and teacher are compatible: {data.x.shape[0]} rows of shape {list(data.row_shape)}, "
        f"{num_classes} classes, {'labelled' if labelled else 'unlabelled (soft targets only)'}",
        data={
            "rows": int(data.x.shape[0]),
            "row_shape": list(data.row_shape),
            "num_classes": num_classes,
            "labelled": labelled,
            "has_x_val": data.x_val is not None,
        },
    )
    return _Validated(job, dev, data, tch, num_classes)


def _prepare(v: _Validated, reporter: Reporter) -> tuple[Split, TrainContext, dict[str, float]]:
    """Split, move data to the device, cache teacher logits, build the seeded student.

    Returns the split, the training context and the teacher's held-out metrics.
    """
    dev, job = v.device, v.job
    split = split_dataset(v.data, job.val_fraction, job.seed)

    def on_device(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(a).to(dev)

    reporter.event(
        "load",
        f"{len(split.x_train)} training rows, {len(split.x_val)} held-out rows ({split.val_source}) on {dev}",
        data={"train_rows": len(split.x_train), "val_rows": len(split.x_val), "val_source": split.val_source,
              "device": str(dev), "teacher_format": v.teacher.format},
    )

    started = time.perf_counter()
    t_train = teacher_logits(v.teacher, split.x_train, should_stop=reporter.should_stop)
    t_val = teacher_logits(v.teacher, split.x_val, should_stop=reporter.should_stop)
    y_val = on_device(split.y_val)
    teacher_metrics = classification_metrics(t_val, None, y_val)
    seconds = time.perf_counter() - started
    reporter.event(
        "teacher_outputs",
        f"teacher logits cached for {len(split.x_train) + len(split.x_val)} rows in {seconds:.2f}s",
        data={"seconds": seconds, **teacher_metrics},
    )

    # Seed right before anything random: weight init, dropout, batch order.
    torch.manual_seed(job.seed)
    student, architecture = job.student.create(v.data.row_shape, v.num_classes)
    ctx = TrainContext(
        student=student.to(dev),
        architecture=architecture,
        device=dev,
        x_train=on_device(split.x_train),
        t_train=t_train,
        y_train=on_device(split.y_train),
        x_val=on_device(split.x_val),
        t_val=t_val,
        y_val=y_val,
        reporter=reporter,
        generator=torch.Generator().manual_seed(job.seed),
        progress=ProgressTracker(reporter, sum(s.epochs for s in job.steps)),
    )
    return split, ctx, teacher_metrics


def _run_steps(job: JobSpec, ctx: TrainContext, split: Split, example: torch.Tensor) -> list[dict[str, Any]]:
    """Run every step; returns one report row per step (measured right after it)."""
    rows: list[dict[str, Any]] = []
    for index, step in enumerate(job.steps):
        ctx.reporter.event(
            "step_started",
            f"step {index}: {step.name} ({step.method}), {step.epochs} epochs",
            data={"index": index, "kind": step.name, "method": step.method, "epochs": step.epochs},
        )
        step.run(ctx, index)
        metrics = ctx.evaluate()
        cpu_student = _cpu_eval_copy(ctx.student)
        row = model_row(
            _students.num_parameters(ctx.student),
            _student_size_bytes(cpu_student, example),
            _student_latency(cpu_student, split.x_val),
            metrics,
        )
        rows.append({"index": index, "kind": step.name, "method": step.method, **row})
        ctx.reporter.event("step_finished", f"step {index} finished: " + _describe(metrics), data=metrics)
    return rows


def _export(job: JobSpec, ctx: TrainContext, example: torch.Tensor, out_dir: Path) -> list[ArtifactFile]:
    """Write and verify the final student in every requested format."""
    export_input = export_mod.ExportInput(
        _cpu_eval_copy(ctx.student), ctx.architecture, example, out_dir, len(job.steps) - 1
    )
    artifacts: list[ArtifactFile] = []
    for name in job.exports:
        files = export_registry.get(name)(None).export(export_input)
        artifacts += files
        for f in files:
            size = f.path.stat().st_size
            ctx.reporter.event(
                "export",
                f"exported {f.kind} as {f.format}: {f.path.name} ({size} bytes), verified",
                data={"format": f.format, "kind": f.kind, "file": f.path.name, "size_bytes": size},
            )
    return artifacts


def run(
    spec: Mapping[str, Any],
    teacher: TeacherSource,
    dataset: DatasetSource,
    out_dir: Path,
    reporter: Reporter,
    *,
    device: str = "auto",
    threads: int | None = None,
) -> EngineResult:
    """Distil ``teacher`` into the student ``spec`` describes, using ``dataset``.

    Writes artifacts into ``out_dir`` and returns them with metrics and the
    report. Raises :class:`EngineError` (``.code``) for user-fixable problems
    and :class:`Cancelled` when ``reporter.should_stop()`` turns True.
    """
    v = _validate(spec, teacher, dataset, reporter, device, threads)
    split, ctx, teacher_metrics = _prepare(v, reporter)
    example = torch.from_numpy(split.x_val[:VERIFY_ROWS])
    step_rows = _run_steps(v.job, ctx, split, example)
    ctx.check_stop("before export")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts = _export(v.job, ctx, example, out_dir)

    # ---- report: the final student is the last step's row, sized as shipped.
    final = {k: val for k, val in step_rows[-1].items() if k not in ("index", "kind", "method")}
    ts_file = next((a.path for a in artifacts if a.kind == "student" and a.format == "torchscript"), None)
    if ts_file is not None:
        final["size_bytes"] = ts_file.stat().st_size
    teacher_row = model_row(
        v.teacher.num_parameters,
        v.teacher.size_bytes,
        measure_latency(v.teacher.latency_fn, split.x_val),
        {**teacher_metrics, "agreement": 1.0},  # the teacher agrees with itself by definition
    )
    report = build_report(
        teacher=teacher_row,
        steps=step_rows,
        student=final,
        reproducibility={
            "seed": v.job.seed,
            "versions": versions(),
            "spec_sha256": spec_sha256(spec),
            "data_sha256": dataset.sha256 or file_sha256(Path(dataset.path)),
            "teacher_sha256": teacher.sha256 or file_sha256(Path(teacher.path)),
            "device": str(v.device),
            "threads": torch.get_num_threads(),
        },
        data={
            "train_rows": len(split.x_train),
            "val_rows": len(split.x_val),
            "val_source": split.val_source,
            "num_classes": v.num_classes,
            "labelled": v.data.y is not None,
            "input_shape": list(v.data.row_shape),
        },
    )
    artifacts.append(write_report(report, out_dir))
    reporter.event(
        "report",
        f"report written: compression {_times(report['compression_ratio'])}, "
        f"speedup {_times(report['speedup'])}, " + _describe(final),
        data={"compression_ratio": report["compression_ratio"], "speedup": report["speedup"]},
    )
    student_metrics = {k: final[k] for k in ("accuracy", "agreement", "f1_macro") if k in final}
    teacher_out = {k: teacher_row[k] for k in ("accuracy", "f1_macro") if k in teacher_row}
    return EngineResult(artifacts=artifacts, metrics={"teacher": teacher_out, "student": student_metrics}, report=report)


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.1f}x"


def _describe(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "agreement", "f1_macro") if k in metrics)

