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
from .data import check_label_range, load_dataset, split_dataset
from .evaluate import classification_metrics
from .registry import exports as export_registry
from .report import build_report, file_sha256, measure_latency, model_row, spec_sha256, versions, write_report
from .spec import parse_spec
from .teachers import load_teacher, probe_teacher, teacher_logits
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
    # ---- validate ------------------------------------------------------------
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

    # ---- load ----------------------------------------------------------------
    split = split_dataset(data, job.val_fraction, job.seed)
    x_train = torch.from_numpy(split.x_train).to(dev)
    x_val = torch.from_numpy(split.x_val).to(dev)
    y_train = torch.from_numpy(split.y_train).to(dev) if split.y_train is not None else None
    y_val = torch.from_numpy(split.y_val).to(dev) if split.y_val is not None else None
    reporter.event(
        "load",
        f"{len(split.x_train)} training rows, {len(split.x_val)} held-out rows ({split.val_source}) on {dev}",
        data={"train_rows": len(split.x_train), "val_rows": len(split.x_val), "val_source": split.val_source,
              "device": str(dev), "teacher_format": tch.format},
    )

    # ---- teacher outputs (once, cached) ---------------------------------------
    started = time.perf_counter()
    t_train = teacher_logits(tch, split.x_train, should_stop=reporter.should_stop)
    t_val = teacher_logits(tch, split.x_val, should_stop=reporter.should_stop)
    teacher_metrics = classification_metrics(t_val, None, y_val)
    reporter.event(
        "teacher_outputs",
        f"teacher logits cached for {len(split.x_train) + len(split.x_val)} rows "
        f"in {time.perf_counter() - started:.2f}s",
        data={"seconds": time.perf_counter() - started, **teacher_metrics},
    )

    # ---- steps -----------------------------------------------------------------
    # Seed right before anything random: weight init, dropout, batch order.
    torch.manual_seed(job.seed)
    student, architecture = job.student.create(data.row_shape, num_classes)
    student = student.to(dev)
    ctx = TrainContext(
        student=student,
        architecture=architecture,
        device=dev,
        x_train=x_train,
        t_train=t_train,
        y_train=y_train,
        x_val=x_val,
        t_val=t_val,
        y_val=y_val,
        reporter=reporter,
        generator=torch.Generator().manual_seed(job.seed),
        progress=ProgressTracker(reporter, sum(s.epochs for s in job.steps)),
    )
    example = torch.from_numpy(split.x_val[:VERIFY_ROWS])
    step_rows: list[dict[str, Any]] = []
    for index, step in enumerate(job.steps):
        reporter.event(
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
        step_rows.append({"index": index, "kind": step.name, "method": step.method, **row})
        reporter.event("step_finished", f"step {index} finished: " + _describe(metrics), data=metrics)
    ctx.check_stop("before export")

    # ---- export ------------------------------------------------------------------
    final_index = len(job.steps) - 1
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu_student = _cpu_eval_copy(ctx.student)
    export_input = export_mod.ExportInput(cpu_student, ctx.architecture, example, out_dir, final_index)
    artifacts: list[ArtifactFile] = []
    for name in job.exports:
        files = export_registry.get(name)(None).export(export_input)
        artifacts += files
        for f in files:
            reporter.event(
                "export",
                f"exported {f.kind} as {f.format}: {f.path.name} ({f.path.stat().st_size} bytes), verified",
                data={"format": f.format, "kind": f.kind, "file": f.path.name, "size_bytes": f.path.stat().st_size},
            )

    # ---- report ------------------------------------------------------------------
    final = dict(step_rows[-1])
    for key in ("index", "kind", "method"):
        final.pop(key)
    ts_file = next((a.path for a in artifacts if a.kind == "student" and a.format == "torchscript"), None)
    if ts_file is not None:
        final["size_bytes"] = ts_file.stat().st_size
    teacher_row = model_row(
        tch.num_parameters,
        tch.size_bytes,
        measure_latency(tch.latency_fn, split.x_val),
        {**teacher_metrics, "agreement": 1.0},
    )
    report = build_report(
        teacher=teacher_row,
        steps=step_rows,
        student=final,
        reproducibility={
            "seed": job.seed,
            "versions": versions(),
            "spec_sha256": spec_sha256(spec),
            "data_sha256": dataset.sha256 or file_sha256(Path(dataset.path)),
            "teacher_sha256": teacher.sha256 or file_sha256(Path(teacher.path)),
            "device": str(dev),
            "threads": torch.get_num_threads(),
        },
        data={
            "train_rows": len(split.x_train),
            "val_rows": len(split.x_val),
            "val_source": split.val_source,
            "num_classes": num_classes,
            "labelled": labelled,
            "input_shape": list(data.row_shape),
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

