"""Phases 4-5 per step: run it, measure it, check its gate, export and verify its output.

:func:`run_steps` runs the job's steps in order (skipping those a resumed checkpoint finished),
gives each one report row measured right after it, stops at the first step that breaks its
``gate`` (:class:`StepsOutcome` ``.failed``), and writes and verifies each passing step's exports.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.devices import is_cpu_only
from engine.training import checkpoint as ckpt_mod
from engine.steps import compress as compress_mod
from engine import metrics as evaluate_mod
from engine.export import formats as export_mod
from engine.metrics import task_metrics
from engine.report.measure import cpu_eval_copy, describe, gzip_size, measure_row
from engine.report.timings import phase
from engine.registry import exports as export_registry
from engine.pipeline.resume import Resume, StudentSnapshots
from engine.pipeline.job import JobPlan
from engine.training.context import TrainContext
from engine.values import ArtifactFile
from engine.errors import InvalidSpec


def gate_check(step: Any, index: int, row: dict[str, Any], teacher_row: Mapping[str, Any]) -> dict[str, Any] | None:
    """The step's gate verdict (metric, teacher/student values, drop, max_drop, passed), or None without a gate."""
    gate = getattr(step, "gate", None)
    if gate is None:
        return None
    metric = gate.metric
    if metric not in row or metric not in teacher_row:
        raise InvalidSpec(f"steps[{index}].gate.metric: {metric!r} was not measured for this job")
    value = float(row[metric])
    if getattr(gate, "against", "teacher") == "labels":  # an absolute floor, whatever the teacher scores
        return {"metric": metric, "against": "labels", "value": value, "min": float(gate.min),
                "teacher": float(teacher_row[metric]), "passed": value >= gate.min - 1e-12,
                "verdict": f"{metric} {value:.4f} against the labels, {'≥' if value >= gate.min - 1e-12 else '<'} "
                           f"the floor {gate.min:.4f}"}
    drop = float(teacher_row[metric]) - value
    return {"metric": metric, "against": "teacher", "teacher": float(teacher_row[metric]), "value": value,
            "drop": drop, "max_drop": float(gate.max_drop), "passed": drop <= gate.max_drop + 1e-12,
            "verdict": f"{metric} drop {drop:.4f} below the teacher's, {'within' if drop <= gate.max_drop + 1e-12 else 'over'} "
                       f"{gate.max_drop:.4f}"}


def export_metrics(ctx: TrainContext, f: ArtifactFile) -> dict[str, float] | None:
    """Held-out metrics of a reloaded export (what a user gets from the file)."""
    if f.format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.jit.load(str(f.path), map_location="cpu")
    elif f.format == "onnx":
        model = compress_mod.OrtModule(f.path)
    else:
        return None

    def take(a: int, b: int) -> list[torch.Tensor]:
        return [t.cpu() for t in ctx.val.slice(a, b)]

    outputs = evaluate_mod.predict(model, None, take=take, n=ctx.val.n)  # type: ignore[arg-type]
    return task_metrics(ctx.task, outputs, ctx.t_val.cpu(), None if ctx.y_val is None else ctx.y_val.cpu())


def export_step(job: JobPlan, ctx: TrainContext, example: list[torch.Tensor], inputs: list[str], out_dir: Path,
                 index: int, torchscript_bytes: bytes | None = None
                 ) -> tuple[list[ArtifactFile], dict[str, Any], dict[str, str]]:
    """Write and verify step ``index``'s output in every requested format (``torchscript_bytes``: the
    model already saved as TorchScript, see :func:`engine.report.measure.measure_row`)."""
    plan = ctx.step_outputs.get(index)
    extra = dict(plan.export) if plan is not None else {}
    export_input = export_mod.ExportInput(
        cpu_eval_copy(ctx.student), ctx.architecture, example, out_dir, index,
        input_names=list(inputs), output_name="logits" if ctx.task == "classification" else "output",
        prefix=f"step{index}_" if len(job.steps) > 1 else "", task=ctx.task, torchscript_bytes=torchscript_bytes,
        **extra,
    )
    artifacts: list[ArtifactFile] = []
    measured: dict[str, Any] = {}
    for name in job.exports:
        try:
            files = export_registry.get(name)().export(export_input)
        except export_mod.SkipExport as exc:
            ctx.reporter.event("export", f"step {index}: {name} export skipped: {exc}", level="warning",
                               data={"step": index, "format": name, "skipped": str(exc)})
            measured[name] = {"skipped": str(exc)}
            continue
        artifacts += files
        for f in files:
            size = f.path.stat().st_size
            if f.kind == "student":
                with phase("verify"):
                    m = export_metrics(ctx, f)
                if m is not None:
                    measured[f.format] = {"file": f.path.name, "size_bytes": size, **m}
            ctx.reporter.event(
                "export",
                f"step {index}: exported {f.kind} as {f.format}: {f.path.name} ({size} bytes), verified",
                data={"step": index, "format": f.format, "kind": f.kind, "file": f.path.name, "size_bytes": size},
            )
    if ctx.device.type != "cpu" and not is_cpu_only(ctx.student):
        ctx.student.to(ctx.device)
    return artifacts, measured, dict(export_input.notes)


@dataclass
class StepsOutcome:
    """Report rows and exports (by step index) of the steps that ran; ``failed``/``message`` name a broken gate."""

    rows: list[dict[str, Any]]
    artifacts: dict[int, list[ArtifactFile]]
    failed: dict[str, Any] | None = None
    message: str = ""


def run_steps(job: JobPlan, ctx: TrainContext, example: list[torch.Tensor], val_x: Mapping[str, np.ndarray],
               teacher_metrics_row: Mapping[str, Any], inputs: list[str], out_dir: Path,
               students: StudentSnapshots | None = None, resumed: Resume | None = None,
               on_measured: Callable[[list[dict[str, Any]]], None] | None = None) -> StepsOutcome:
    """Run every step; one report row per step (measured right after it), its exports, its gate.

    With ``resumed``, the steps before ``resumed.step`` are skipped (their rows and exports come
    from the checkpoint); ``students`` snapshots each step's start for ``ctx.checkpoint``.
    ``on_measured(rows)`` is called once the last row is measured (the last step's, or a failed gate's),
    before that step's exports: nothing of the steps is timed after it.
    """
    outcome = StepsOutcome([], {})
    ckpt = ctx.checkpoint
    first = 0
    if resumed is not None:
        outcome.rows.extend(resumed.rows)
        outcome.artifacts.update(resumed.artifacts)
        first = resumed.step
    if ckpt is not None:
        ckpt.rows = outcome.rows
        ckpt.steps_total = len(job.steps)
    for index, step in enumerate(job.steps):
        if index < first:
            continue
        if index == first:
            if resumed is not None:
                assert resumed.start is not None and resumed.start["rng"] is not None
                ckpt_mod.set_rng_state(resumed.start["rng"], ctx.generator)
            if ckpt is not None and students is not None:
                ckpt.begin_step(index, resumed.start if resumed is not None else students.snapshot(ctx, last=False))
        ctx.reporter.event(
            "step_started",
            f"step {index}: {step.name} ({step.method}), {step.epochs} epochs",
            data={"index": index, "kind": step.name, "method": step.method, "epochs": step.epochs},
        )
        ctx.progress.step_started(step_index=index, step_kind=step.name, epochs=step.epochs)
        with phase("train"):
            step.run(ctx, index)
        with phase("evaluate"):
            metrics = ctx.evaluate()
        with phase("measure"):
            row, torchscript_bytes = measure_row(ctx, example, val_x, metrics)
        info = ctx.step_info.get(index, {})
        data = {k: val for k, val in info.items()
                if k in ("dataset", "rows", "coreset", "synthetic", "val_source", "calibration_rows")}
        extra = {k: info[k] for k in ("early_stopping", "schedule", "auto") if k in info}
        plan = ctx.step_outputs.get(index)
        details = dict(plan.details) if plan is not None else {}
        full = {"index": index, "kind": step.name, "method": step.method, **row, "data": data, **extra, **details}
        gate = gate_check(step, index, full, teacher_metrics_row)
        if gate is not None:
            full["gate"] = gate
        outcome.rows.append(full)
        if on_measured is not None and (index + 1 == len(job.steps) or (gate is not None and not gate["passed"])):
            on_measured(outcome.rows)
        ctx.reporter.event("step_finished", f"step {index} finished: " + describe(metrics), data=metrics)
        if gate is not None and not gate["passed"]:
            what = f"{step.name} {step.method}"
            if gate["against"] == "labels":
                outcome.message = (f"step {index} ({what}): {gate['metric']} {gate['value']:.3f} against the labels "
                                   f"is below the gate's floor {gate['min']:.3f}")
            else:
                outcome.message = (f"step {index} ({what}): {gate['metric']} dropped {gate['drop']:.3f} below the "
                                   f"teacher's (allowed {gate['max_drop']:.3f})")
            outcome.failed = {"failed_step": index, **{k: gate[k] for k in ("metric", "against", "drop", "max_drop",
                                                                                "value", "min") if k in gate}}
            ctx.reporter.event("quality_gate", outcome.message, level="error", data=outcome.failed)
            break
        if gate is not None:
            ctx.reporter.event("quality_gate", f"step {index}: {gate['verdict']}", data={"step": index, **gate})
        ctx.check_stop("before export")
        with phase("export"):
            files, measured, notes = export_step(job, ctx, example, inputs, out_dir, index, torchscript_bytes)
        outcome.artifacts[index] = files
        ts_file = next((f.path for f in files if f.kind == "student" and f.format == "torchscript"), None)
        if ts_file is not None and torchscript_bytes is None:  # sized as shipped (the row was, when it wrote them)
            full["size_bytes"] = ts_file.stat().st_size
            full["size_gzip_bytes"] = gzip_size(ts_file.read_bytes())
        if measured:
            full["exports"] = measured
        if notes:
            full.setdefault("quantization", {})["export_notes"] = notes
        if ckpt is not None and students is not None:
            ckpt.step_done(index, files, students.snapshot(ctx, last=index + 1 >= len(job.steps)))
    return outcome
