"""Phase 6, ``report``: ``report.json``, the model card and plots, and the job's :class:`EngineResult`.

:func:`assemble_result` turns the steps' outcome into the report (the final student is the last
passing step's row, sized as shipped), writes it with the card and plots, and returns the
result - or raises :class:`QualityGateFailed` carrying it when a step broke its gate.
"""

from __future__ import annotations

from dataclasses import dataclass

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engine.data.plan import DataPlan
from engine.metrics import METRIC_KEYS
from engine.errors import error_summary
from engine.report.honesty import report_warnings
from engine.report.measure import describe, times
from engine.report.background import SideWork, teacher_gzip_size
from engine.report.rows import build_report, spec_sha256, versions, write_report
from engine.report.timings import current, phase
from engine.pipeline.run_steps import StepsOutcome
from engine.training.context import TrainContext
from engine.values import ArtifactFile, EngineResult, Reporter, TeacherSource
from engine.errors import QualityGateFailed
from engine.pipeline.validate import Validated

_ROW_KEYS = ("num_parameters", "nonzero_parameters", "size_bytes", "size_gzip_bytes", "latency_ms", *METRIC_KEYS)


@dataclass(frozen=True)
class FinishedSteps:
    """Everything a job's run produced that its report is made from.

    ``spec``: the stored spec (hashed into the report); ``teacher``: its source; ``validated`` and ``plan``:
    the job's checks and data; ``ctx``: the training state after the steps; ``outcome``: the steps' rows,
    files and the failed gate if any; ``teacher_row`` / ``baseline_row``: the report rows to compare with.
    """

    spec: Mapping[str, Any]
    teacher: TeacherSource
    validated: Validated
    plan: DataPlan
    ctx: TrainContext
    outcome: StepsOutcome
    teacher_row: dict[str, Any]
    baseline_row: dict[str, Any] | None
    #: hashes, the teacher's gzip size and the plots, started in the background (None: all done here)
    side: SideWork | None = None


def assemble_result(done: FinishedSteps, out_dir: Path, reporter: Reporter) -> EngineResult:
    """Write ``report.json``, the model card and plots for the finished steps; return the :class:`EngineResult`.

    Raises :class:`QualityGateFailed` (``.result`` = the last passing step's exports + report)
    when ``outcome.failed`` names a broken gate.
    """
    spec, teacher, v, plan, ctx = done.spec, done.teacher, done.validated, done.plan, done.ctx
    outcome, teacher_row, baseline_row = done.outcome, done.teacher_row, done.baseline_row
    job, dev = v.job, v.device
    step_rows = outcome.rows
    side = done.side if done.side is not None else SideWork(None)
    teacher_row["size_gzip_bytes"] = side.result("teacher_gzip", lambda: teacher_gzip_size(Path(teacher.path)))

    # ---- report: the final student is the last passing step's row, sized as shipped.
    passed_rows = step_rows if outcome.failed is None else step_rows[:-1]
    final_src = passed_rows[-1] if passed_rows else None
    final = ({k: val for k, val in final_src.items() if k in _ROW_KEYS} if final_src is not None
             else {k: val for k, val in teacher_row.items() if k in _ROW_KEYS})
    primary_id = job.dataset_id if job.dataset_id in v.sources else next(iter(v.sources), None)
    first = v.datasets.get(primary_id) if primary_id else None
    report = build_report(
        architecture=ctx.architecture if outcome.failed is None else None,
        teacher=teacher_row,
        steps=step_rows,
        student=final,
        reproducibility={
            "seed": job.seed,
            "versions": versions(),
            "spec_sha256": spec_sha256(spec),
            "data_sha256": side.sha256(Path(v.sources[primary_id].path), v.sources[primary_id].sha256)
            if primary_id else None,
            "datasets_sha256": {k: side.sha256(Path(s.path), s.sha256) for k, s in v.sources.items()
                                if k in v.datasets},
            "teacher_sha256": side.sha256(Path(teacher.path), teacher.sha256),
            "device": str(dev),
            "threads": torch.get_num_threads(),
        },
        data={
            "task": v.task,
            "train_rows": step_rows[0]["data"].get("rows") if step_rows else None,
            "val_rows": plan.val.n,
            "val_source": plan.val_source,
            "eval_dataset": plan.eval_dataset,
            "num_classes": v.out_dim if v.task == "classification" else None,
            "output_width": v.out_dim,
            "labelled": plan.y_val is not None,
            "input_shape": list(v.row_shapes[v.inputs[0]]),
            "inputs": {k: list(s) for k, s in v.row_shapes.items()},
            "classes": first.classes if first is not None else None,
            "steps": [r["data"] for r in step_rows],
            **({"note": "held-out metrics are measured on synthetic samples (no eval_dataset_id given)"}
               if plan.val_source == "synthetic" else {}),
        },
    )
    report["recipe"] = list(spec.get("steps") or [])
    if warnings := report_warnings(teacher_row, plan.y_val is not None):
        report["warnings"] = warnings
        for w in warnings:
            reporter.event("report", w["message"], level="warning", data=w)
    if outcome.failed is not None:
        report["gate"] = outcome.failed
        if final_src is None:
            report["student"] = None
    if baseline_row is not None:
        report["baseline"] = baseline_row
        report["teacher_gain"] = {k: float(final[k]) - float(baseline_row[k]) for k in METRIC_KEYS
                                  if k in final and k in baseline_row}
    extras: list[ArtifactFile] = []
    try:
        from engine.report import card

        extras += side.result("plots", lambda: card.write_plots(ctx.history, teacher_row, step_rows, out_dir, v.task))
        with phase("card"):
            extras.append(card.write_model_card(report, spec, teacher, v, out_dir, failed=outcome.message or None))
    except Exception as exc:  # noqa: BLE001 - the card and plots are extras; never fail a job over them
        reporter.event("report", f"model card / plots skipped: {error_summary(exc)}", level="warning")
    timings = current()
    if timings is not None:
        report["timings"] = timings.finish()
    write_artifact = write_report(report, out_dir)
    passed_steps = sorted(outcome.artifacts)
    if outcome.failed is None:
        artifacts = [a for i in passed_steps for a in outcome.artifacts[i]]
    else:
        artifacts = list(outcome.artifacts[passed_steps[-1]]) if passed_steps else []
    artifacts += extras + [write_artifact]
    student_metrics = {k: final[k] for k in METRIC_KEYS if k in final} if final_src is not None else {}
    teacher_out = {k: teacher_row[k] for k in METRIC_KEYS if k in teacher_row and k not in ("agreement",)}
    metrics: dict[str, Any] = {"teacher": teacher_out, "student": student_metrics}
    if baseline_row is not None:
        metrics["baseline"] = {k: baseline_row[k] for k in METRIC_KEYS if k in baseline_row}
        metrics["teacher_gain"] = report["teacher_gain"]
    result = EngineResult(artifacts=artifacts, metrics=metrics, report=report)
    if outcome.failed is not None:
        reporter.event("report", "report written (quality gate failed): " + outcome.message, level="error",
                       data=outcome.failed)
        raise QualityGateFailed(outcome.message, result)
    reporter.event(
        "report",
        f"report written: compression {times(report['compression_ratio'])}, "
        f"speedup {times(report['speedup'])}, " + describe(final),
        data={"compression_ratio": report["compression_ratio"], "speedup": report["speedup"]},
    )
    return result
