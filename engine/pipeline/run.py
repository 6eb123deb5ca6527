"""``run()``: one distillation job from spec to artifacts.

Phases (each announced with ``reporter.event``):

1. ``validate`` - parse the spec, load every dataset and the teacher, run the
   teacher on 2 rows of each dataset, check task/loss/label compatibility.
   Fails in well under a second for mismatched inputs, before anything expensive.
2. ``load`` - the held-out rows (``eval_dataset_id``, else ``x_val``/a seeded split of
   the job's dataset, else a slice of synthetic data) and each step's training rows.
3. ``teacher_outputs`` - teacher outputs (and hint features) cached once per transfer set
   (skipped for steps that augment: the teacher then runs on every augmented batch).
4. ``step_started``/``step_finished`` - each step trains the student (``synthesize``,
   ``coreset`` events where used); ``baseline`` trains the label-only twin.
5. ``export`` - write and verify the requested student formats.
6. ``report`` - measure sizes/latencies and write ``report.json``.

Each phase has its module: :mod:`engine.pipeline.job` (the spec) and :mod:`engine.pipeline.validate`,
:mod:`engine.data.plan`, :mod:`engine.pipeline.run_steps` (steps, gates, exports; rows from
:mod:`engine.report.measure`), :mod:`engine.report.result`; checkpoints and resume in
:mod:`engine.pipeline.resume`.
This module creates the student and orchestrates the phases.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Importing the plugin modules registers them.
from engine.devices import is_cpu_only
from engine.training import checkpoint as ckpt_mod
from engine.steps import compress as compress_mod
from engine.export import formats as _export  # noqa: F401
from engine.losses import outputs as _losses  # noqa: F401
from engine.training import optim as _optim  # noqa: F401
from engine.steps import kinds as _steps  # noqa: F401
from engine.lm import components as _lm  # noqa: F401
from engine.students import common, uploaded
from engine.teachers import loading as _teachers
from engine.data.plan import DataPlan
from engine.metrics import teacher_metrics
from engine.errors import error_summary
from engine.report.result import FinishedSteps, assemble_result
from engine.report.measure import cpu_eval_copy, describe, student_latency, student_size_bytes, teacher_extras
from engine.report.rows import measure_latency, model_row
from engine.report.background import SideWork
from engine.report.timings import JobTimings, activate, current, describe_timings, phase
from engine.pipeline.resume import Resume, StudentSnapshots, checkpoint_identity, resume
from engine.pipeline.run_steps import run_steps
from engine.training.context import TrainContext
from engine.training.loop import fit
from engine.training.progress import ProgressTracker
from engine.values import DatasetSource, EngineResult, InputInfo, ModelSource, Reporter, TeacherInfo, TeacherSource
from engine.errors import EngineError, InvalidSpec, ShapeMismatch, Unsupported
from engine.pipeline.validate import Validated, validate

#: Held-out rows used to verify exports (enough to catch numeric drift, cheap).
VERIFY_ROWS = 256


# ---------------------------------------------------------------------------------------------
# student


def _input_infos(v: Validated) -> list[InputInfo]:
    """One :class:`InputInfo` per input (shape per row; integer inputs with their largest value)."""
    infos = []
    for name in v.inputs:
        is_int, max_value = False, None
        for ds in v.datasets.values():
            if ds.is_integer(name):
                is_int = True
                for arr in (ds.x[name], (ds.x_val or {}).get(name)):
                    if arr is not None and len(arr):
                        m = int(np.asarray(arr).max())
                        max_value = m if max_value is None else max(max_value, m)
        infos.append(InputInfo(name, tuple(v.row_shapes[name]), is_int, max_value))
    return infos


def _teacher_as_student(v: Validated, example: list[torch.Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    """No ``student`` in the spec: the steps compress the teacher itself (an editable copy)."""
    t = v.teacher
    if t.module is None:  # ONNX: only onnx_int8 steps (checked in _validate) - they quantize the file
        inverse = {data: sess for sess, data in getattr(t, "mapping", {}).items()}
        feeds = [inverse.get(name, name) for name in v.inputs]
        return compress_mod.OrtModule(t.path, feeds), {"family": "onnx", "source": "teacher"}
    if getattr(t, "architecture", None) and t.format == "safetensors":
        module = copy.deepcopy(t.module).cpu()
        architecture = {**dict(t.architecture), "source": "teacher"}
    else:
        from engine.students import derive
        from engine.compression.editable import to_editable

        try:
            module = to_editable(t.module, [e.detach().cpu()[:2] for e in example])
        except EngineError as exc:
            raise Unsupported(f"prune/quantize steps without a student work on the teacher itself, "
                              f"but: {exc.message}") from None
        try:
            architecture = {**derive.chain_architecture(module), "source": "teacher"}
        except EngineError:
            architecture = {"family": "teacher", "format": t.format}
    for p in module.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return module.train(), architecture


def _create_student(v: Validated, models: Mapping[str, ModelSource] | None,
                    example: list[torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The job's student and its architecture dict: built, uploaded (``models``) or the teacher itself."""
    student = v.job.student
    if student is None:
        return _teacher_as_student(v, example or [])
    if v.job.uploaded_student is not None:
        model_id = v.job.uploaded_student.model_id
        if not models or model_id not in models:
            raise InvalidSpec(f"student model {model_id!r} was not provided")
        return uploaded.load_uploaded(models[model_id], _teachers.load_module)
    return student.create(_input_infos(v), v.out_dim, _teacher_info(v))


def _check_student(model: nn.Module, v: Validated, example: list[torch.Tensor]) -> None:
    """Raise shape_mismatch unless the student maps 2 example rows to outputs [2, out_dim]."""
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(*[e[:2] for e in example])
            model.train(was)
    except EngineError:
        raise
    except Exception as exc:
        raise ShapeMismatch(f"the student cannot take the data's inputs: "
                          f"{error_summary(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != v.out_dim:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeMismatch(f"the student outputs {shape} per batch but the teacher's outputs "
                          f"are [batch, {v.out_dim}]")


# ---------------------------------------------------------------------------------------------
# run


def run(
    spec: Mapping[str, Any],
    teacher: TeacherSource,
    datasets: Mapping[str, DatasetSource] | DatasetSource | None,
    out_dir: Path,
    reporter: Reporter,
    *,
    device: str = "auto",
    threads: int | None = None,
    models: Mapping[str, ModelSource] | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every_seconds: float = 30.0,
) -> EngineResult:
    """Run the job ``spec`` describes on ``teacher``: distil, prune, quantize (steps in order).

    ``datasets`` maps dataset ids (``spec["dataset_id"]``, each step's ``dataset_id``,
    ``spec["eval_dataset_id"]``) to sources; a bare :class:`DatasetSource` is the job's
    dataset; None for data-free jobs. ``models`` maps ``student.model_id`` to a
    :class:`ModelSource`. Writes artifacts into ``out_dir`` and returns them with metrics and
    the report. Raises :class:`EngineError` (``.code``) for user-fixable problems,
    :class:`QualityGateFailed` (``.result`` = the last passing step's artifacts + report) when a
    step breaks its ``gate``, and :class:`Cancelled` when ``reporter.should_stop()`` turns True.

    ``checkpoint_dir``: keep ``checkpoint_dir/checkpoint.pt`` (after each step, and after a
    distill epoch when ``checkpoint_every_seconds`` passed since the last write; 0 = every epoch)
    and resume from it when it matches this job (see :mod:`.checkpoint`).
    """
    timings = JobTimings()
    with activate(timings):
        try:
            out_dir = Path(out_dir)
            if teacher.format in ("hf_transformers", "endpoint") or teacher.task == "causal_lm":
                from engine.lm.pipeline import run_lm  # generative LMs: their own phases (transformers loads only here)

                return run_lm(spec, teacher, datasets, out_dir, reporter, device=device, threads=threads,
                              models=models)
            return _run(spec, teacher, datasets, out_dir, reporter, device, threads, models, checkpoint_dir,
                        checkpoint_every_seconds)
        finally:
            # every job ends with its phase timings (the same numbers as report.json's "timings")
            final = timings.finish()
            reporter.event("timings", f"job took {final['total']:.2f}s: " + describe_timings(final), data=final)


def _run(spec: Mapping[str, Any], teacher: TeacherSource, datasets: Mapping[str, DatasetSource] | DatasetSource | None,
         out_dir: Path, reporter: Reporter, device: str, threads: int | None, models: Mapping[str, ModelSource] | None,
         checkpoint_dir: Path | None, checkpoint_every_seconds: float) -> EngineResult:
    """:func:`run` for fixed-shape models (classification, regression, embedding), inside its timings."""
    with phase("validate"):
        v = validate(spec, teacher, datasets, reporter, device, threads, out_dir)
    job, dev = v.job, v.device
    with phase("load"):
        plan = DataPlan(v, reporter, out_dir)
    with phase("teacher_scoring"):  # its held-out outputs were cached (and timed) by the DataPlan
        teacher_row_metrics = teacher_metrics(v.task, plan.t_val, plan.y_val)
    _report_loaded(v, plan, teacher_row_metrics, reporter)

    example = plan.val.slice(0, VERIFY_ROWS)
    example_cpu = [e.detach().cpu() for e in example]
    val_x_np = {k: np.asarray(a[: min(64, a.shape[0])]) for k, a in plan.val_x.items()}

    # Seed right before anything random: weight init, dropout, batch order.
    torch.manual_seed(job.seed)
    with phase("student"):
        student, architecture = _create_student(v, models, example_cpu)
        if not is_cpu_only(student):
            student = student.to(dev)
        _check_student(student, v, example if not is_cpu_only(student) else example_cpu)
    init_state = copy.deepcopy(student.state_dict()) if job.baseline else None
    total_epochs = sum(s.epochs for s in job.steps) * (2 if job.baseline else 1)
    progress = ProgressTracker(reporter, total_epochs)

    def make_student(infos: list[InputInfo]) -> tuple[nn.Module, dict[str, Any]]:
        torch.manual_seed(job.seed)
        return job.student.create(infos, v.out_dim, _teacher_info(v))

    ctx = _train_context(v, plan, reporter, progress, student, architecture,
                         make_student=make_student if hasattr(job.student, "create") else None,
                         work_dir=out_dir / "work")
    out_dir.mkdir(parents=True, exist_ok=True)
    students, resumed = _start_checkpoints(spec, v, teacher, models, ctx, out_dir, reporter,
                                           checkpoint_dir, checkpoint_every_seconds)
    teacher_row = model_row(v.teacher.num_parameters, v.teacher.size_bytes,
                            measure_latency(v.teacher.latency_fn, val_x_np), teacher_row_metrics)
    with phase("measure"):
        teacher_row.update(teacher_extras(v, teacher))
    files = {k: s.path for k, s in v.sources.items() if k in v.datasets and not s.sha256}
    files = files if teacher.sha256 else {**files, "teacher": teacher.path}
    side = SideWork(current())
    if SideWork.spare_core(torch.get_num_threads()):
        side.start_files(teacher.path, files)  # GIL-free: overlaps training on the core torch leaves free

    def start_side_work(rows: list[dict[str, Any]]) -> None:
        """Once nothing is timed any more: hashes, the teacher's gzip size and the plots in the background."""
        side.start_files(teacher.path, files)
        side.start_plots(ctx.history, teacher_row, rows, out_dir, v.task)

    try:
        try:
            outcome = run_steps(job, ctx, example_cpu, val_x_np, teacher_row, v.inputs, out_dir, students, resumed,
                                on_measured=None if job.baseline else start_side_work)
        finally:
            shutil.rmtree(out_dir / "work", ignore_errors=True)

        baseline_row = None
        if job.baseline and outcome.failed is None:
            assert init_state is not None
            with phase("baseline"):
                baseline_row = _run_baseline(v, plan, models, init_state, architecture, progress, reporter,
                                             example_cpu, val_x_np)
        ctx.check_stop("before the report")
        start_side_work(outcome.rows)  # a baseline job, or a resumed one with no step left to run
        done = FinishedSteps(spec, teacher, v, plan, ctx, outcome, teacher_row, baseline_row, side)
        with phase("report"):
            return assemble_result(done, out_dir, reporter)
    finally:
        side.close()


def _teacher_info(v: Validated) -> TeacherInfo:
    return TeacherInfo(v.teacher.module, getattr(v.teacher, "architecture", None), v.teacher.format, v.task)


def _report_loaded(v: Validated, plan: DataPlan, teacher_row_metrics: Mapping[str, Any], reporter: Reporter) -> None:
    """The ``load`` and ``teacher_outputs`` events: held-out and training rows, the teacher's own metrics."""
    first = v.inputs[0]
    reporter.event(
        "load",
        f"{plan.val.n} held-out rows ({plan.val_source}) on {v.device}; training rows: "
        + ", ".join(f"{k} {plan.train_arrays[k][0][first].shape[0]}" for k in plan.train_arrays) or "synthetic",
        data={"val_rows": plan.val.n, "val_source": plan.val_source, "device": str(v.device),
              "teacher_format": v.teacher.format,
              "train_rows": {k: int(a[0][first].shape[0]) for k, a in plan.train_arrays.items()}},
    )
    reporter.event("teacher_outputs", f"teacher outputs cached for {plan.val.n} held-out rows in "
                   f"{plan.teacher_seconds:.2f}s", data={"seconds": plan.teacher_seconds, **teacher_row_metrics})


def _train_context(v: Validated, plan: DataPlan, reporter: Reporter, progress: ProgressTracker, student: nn.Module,
                   architecture: dict[str, Any], *, baseline: bool = False,
                   make_student: Any = None, work_dir: Path | None = None) -> TrainContext:
    """The state the steps train in: one per student (the job's, and the baseline's twin)."""
    return TrainContext(
        student=student, architecture=architecture, device=v.device, task=v.task, teacher=v.teacher,
        val=plan.val, t_val=plan.t_val, y_val=plan.y_val, reporter=reporter,
        generator=torch.Generator().manual_seed(v.job.seed), progress=progress, step_data=plan.step_data,
        baseline=baseline, make_student=make_student, seed=v.job.seed,
        **({"work_dir": work_dir} if work_dir is not None else {}),
    )


def _start_checkpoints(spec: Mapping[str, Any], v: Validated, teacher: TeacherSource,
                       models: Mapping[str, ModelSource] | None, ctx: TrainContext, out_dir: Path,
                       reporter: Reporter, checkpoint_dir: Path | None, every_seconds: float
                       ) -> tuple[StudentSnapshots | None, Resume | None]:
    """Attach the job's checkpoints to ``ctx`` and resume from a matching one (see :mod:`.resume`)."""
    if checkpoint_dir is None:
        return None, None
    try:
        identity = checkpoint_identity(spec, v, teacher, models)
    except OSError as exc:
        reporter.event("checkpoint", f"checkpoints are off: cannot hash the job's inputs ({exc})", level="warning")
        return None, None
    ckpts = ckpt_mod.JobCheckpoints(Path(checkpoint_dir), every_seconds, identity, reporter, journal=ctx.journal)
    ctx.checkpoint = ckpts
    students = StudentSnapshots(ctx.student, ctx.architecture, v.device)
    resumed = resume(ckpts, students, v.job, ctx, out_dir)
    if resumed is not None:
        steps = len(v.job.steps)
        where = f"step {resumed.step}, epoch {resumed.epoch}" if resumed.step < steps else "the end of the steps"
        reporter.event("resumed", f"resuming from {where} (checkpoint of {resumed.created_at})",
                       data={"step": resumed.step, "epoch": resumed.epoch, "steps": steps,
                             "completed_steps": resumed.step, "checkpoint_time": resumed.created_at,
                             "done_epochs": ctx.progress.done_epochs})
    return students, resumed


def _run_baseline(v: Validated, plan: DataPlan, models: Mapping[str, ModelSource] | None,
                  init_state: Mapping[str, torch.Tensor], architecture: dict[str, Any], progress: ProgressTracker,
                  reporter: Reporter, example_cpu: list[torch.Tensor], val_x_np: Mapping[str, np.ndarray]
                  ) -> dict[str, Any]:
    """The same student, from the same initial weights, trained on labels alone with the same steps and
    budget; its report row."""
    reporter.event("baseline", "training the same student on labels alone (same steps, epochs, optimizer, seed)")
    torch.manual_seed(v.job.seed)
    twin, _ = _create_student(v, models, example_cpu)
    twin = twin.to(v.device)
    twin.load_state_dict(init_state)
    bctx = _train_context(v, plan, reporter, progress, twin, architecture, baseline=True)
    for index, step in enumerate(v.job.steps):
        fit(bctx, step, index)
    bmetrics = bctx.evaluate()
    cpu_twin = cpu_eval_copy(bctx.student)
    row = model_row(common.num_parameters(twin), student_size_bytes(cpu_twin, example_cpu),
                    student_latency(cpu_twin, val_x_np), bmetrics)
    reporter.event("baseline", "baseline finished: " + describe(bmetrics), data=bmetrics)
    return row
