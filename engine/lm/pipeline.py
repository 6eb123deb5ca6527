"""``run_lm()``: a job whose teacher is a generative language model (task ``causal_lm``), spec to artifacts.

:func:`engine.run` hands a job here when its teacher is ``hf_transformers``. Phases (each an event, as in the
classic pipeline):

1. ``validate`` - the spec and its rules (:mod:`jobspec.rules`) against the files: records of each jsonl dataset
   (:mod:`.text_data`), the teacher archive unpacked and loaded (:mod:`.model_dir`), an uploaded student's
   tokenizer compared with the teacher's;
2. ``load`` - held-out records (``eval_dataset_id``, else a seeded ``val_fraction`` of the job's dataset),
   tokenised with the teacher's tokenizer; the teacher's held-out perplexity and logits;
3. ``teacher_outputs`` - per step, the teacher's targets for every training sequence cached once
   (:class:`~engine.lm.divergence.TeacherCache`: top-k + tail when ``top_k``, memory-mapped when large);
4. ``step_started`` / ``step_finished`` - each distill step trains the student (:mod:`.training`);
   ``baseline`` trains its twin on the data alone;
5. ``export`` - ``hf`` (a zipped model directory), ``gguf`` (f16 and q8_0), ``onnx``; each verified;
6. ``report`` - rows, generation samples, ``report.json``, the model card and curves.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

import jobspec
from engine.errors import (InvalidSpec, QualityGateFailed,
                           error_summary)
from engine import registry
from engine.lm import inputs, model_dir, report as lm_report, step_runs, text_data
from engine.lm.teachers import LocalTeacher
from engine.lm.training import LMContext, evaluate
from engine.report.rows import build_report, file_sha256, spec_sha256, versions, write_report
from engine.training.progress import ProgressTracker
from engine.values import ArtifactFile, DatasetSource, EngineResult, ModelSource, Reporter, TeacherSource
from jobspec.base import validation_message
from jobspec.rules import with_task_defaults


def run_lm(spec: Mapping[str, Any], teacher: TeacherSource, datasets: Any, out_dir: Path, reporter: Reporter, *,
           device: str = "auto", threads: int | None = None, models: Mapping[str, ModelSource] | None = None,
           **_checkpointing: Any) -> EngineResult:
    """Run a causal_lm job (see the module docstring). Same contract as :func:`engine.run`; mid-step checkpoints
    are not written for LM jobs yet (a retried attempt starts over)."""
    from engine.pipeline.validate import resolve_device

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    reporter.event("validate", "checking spec, text datasets and the language model")
    try:
        # A stored spec names every field; a script's may not, and gets the causal_lm defaults the API would fill.
        job = with_task_defaults(jobspec.JobSpec.model_validate(dict(spec)), "causal_lm")
    except ValidationError as exc:
        raise InvalidSpec(validation_message(exc)) from None
    dev = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    sources = inputs.sources(job, datasets)
    records = inputs.read_records(job, sources)
    facts = jobspec.Facts(task=teacher.task, teacher_format=teacher.format,
                          labelled={k: kind != "prompt" for k, (kind, _) in records.items()},
                          kinds={k: kind for k, (kind, _) in records.items()})
    try:
        if teacher.format == "endpoint":
            side, tok, student, architecture = inputs.served_setup(job, facts, Path(teacher.path), models, work, records)
        else:
            teacher_dir = model_dir.unpack(Path(teacher.path), work / "teacher")
            tmodel = model_dir.load_causal_lm(teacher_dir)
            tok = model_dir.load_tokenizer(teacher_dir)
            digest = model_dir.tokenizer_digest(tok)
            inputs.check_rules(job, dataclasses.replace(facts, tokenizers={job.teacher_model_id: digest}))
            tmodel = tmodel.to(dev)
            for p in tmodel.parameters():
                p.requires_grad_(False)
            torch.manual_seed(job.seed)
            student, architecture = inputs.build_student(job, tmodel, digest, models, work)
            side = LocalTeacher(tmodel, dev)
        student = student.to(dev)
        reporter.event("validate", f"teacher {side.name}; student {architecture['parameters']:,} parameters "
                       f"({architecture.get('layers')} layers)",
                       data={"teacher": side.name, "student": architecture,
                             "datasets": {k: {"records": len(r), "kind": kind} for k, (kind, r) in records.items()}})
        return _run(job, spec, teacher, sources, records, tok, side, student, architecture, out_dir, reporter, dev)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(job: jobspec.JobSpec, spec: Mapping[str, Any], teacher: TeacherSource, sources: Mapping[str, DatasetSource],
         records: Mapping[str, tuple[str, list[dict]]], tok: Any, side: Any, student: Any,
         architecture: dict[str, Any], out_dir: Path, reporter: Reporter, dev: torch.device) -> EngineResult:
    work = out_dir / "work"
    val_kind, val_records, train_records, val_source = inputs.split_records(job, records)
    distills = [s for s in job.steps if isinstance(s, jobspec.DistillStep)]
    first = distills[0]
    generates = [s for s in job.steps if isinstance(s, jobspec.GenerateStep)]
    if val_kind == "prompt" and generates:
        # Held-out prompts are scored on the teacher's own completions, as the steps train on them.
        val_records = side.complete(tok, [r["prompt"] for r in val_records], generates[0], job.seed,
                                    first.max_seq_len // 2, step_runs.stop_check(reporter))
        val_kind, val_source = "prompt_completion", val_source + ", completed by the teacher"
    val = text_data.tokenize(tok, val_kind, val_records, first.max_seq_len)
    started = time.perf_counter()
    val_teacher = side.val_targets(val)
    teacher_scores = side.scores(val)
    reporter.event("load", f"{val.n} held-out sequences ({val.tokens()} target tokens; {val_source}) on {dev}; "
                   f"teacher perplexity {teacher_scores['perplexity']:.3f}",
                   data={"val_sequences": val.n, "val_tokens": val.tokens(), "val_source": val_source,
                         "device": str(dev), "teacher_perplexity": teacher_scores["perplexity"],
                         "seconds": time.perf_counter() - started})
    init_state = copy.deepcopy(student.state_dict()) if job.baseline else None
    total_epochs = sum(step_runs.step_epochs(s) for s in job.steps) * (2 if job.baseline else 1)
    progress = ProgressTracker(reporter, total_epochs)
    ctx = LMContext(student=student, teacher=side.model, val=val, device=dev, reporter=reporter, progress=progress,
                    generator=torch.Generator().manual_seed(job.seed), work_dir=work, eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))
    prompt = val.input_ids[:1, : lm_report.SAMPLE_PROMPT_TOKENS]
    step_data: list[tuple[int, jobspec.DistillStep, text_data.TokenBlocks]] = []
    rows: list[dict[str, Any]] = []
    generated: dict[int, list[dict[str, str]]] = {}
    artifacts: list[ArtifactFile] = []
    failed: dict[str, Any] | None = None
    passing = None  # the student of the last step that passed, kept while a gated step runs
    for index, step in enumerate(job.steps):
        if failed is not None:
            break
        ds_id = job.step_dataset_id(index)
        if getattr(step, "gate", None) is not None:
            passing = copy.deepcopy(ctx.student).cpu() if rows else None
        if isinstance(step, jobspec.GenerateStep):
            generated[index] = step_runs.run_generate(step, index, train_records[ds_id], tok, side, job.seed, out_dir,
                                         reporter, progress, artifacts)
            continue
        if isinstance(step, jobspec.PruneStep | jobspec.QuantizeStep):
            calib = text_data.tokenize(tok, records[ds_id][0], train_records[ds_id], first.max_seq_len)
            row = step_runs.run_compress(job, ctx, step, index, calib, val_teacher, prompt, tok, work)
            rows.append(row)
            failed = step_runs.gate_check(step, index, row, teacher_scores, reporter)
            continue
        source = job.generated_for(index)
        kind, step_records = (("prompt_completion", generated[source]) if source is not None
                              else (records[ds_id][0], train_records[ds_id]))
        data = text_data.tokenize(tok, kind, step_records, step.max_seq_len)
        step_data.append((index, step, data))
        reporter.event("step_started", f"step {index}: distill {step.loss.type} ({step.loss.divergence}) on "
                       f"{data.n} sequences of {step.max_seq_len} tokens",
                       data={"step_index": index, "kind": "distill", "sequences": data.n})
        started = time.perf_counter()
        cache = side.fill_cache(data, registry.losses.build(step.loss), work / f"cache{index}", ctx.check_stop)
        reporter.event("teacher_outputs", f"teacher targets cached for {data.n} sequences in "
                       f"{time.perf_counter() - started:.2f}s ({cache.nbytes:,} bytes"
                       f"{', memory-mapped' if cache.on_disk else ''})",
                       data={"seconds": time.perf_counter() - started, "bytes": cache.nbytes,
                             "top_k": step.loss.top_k, "memory_mapped": cache.on_disk})
        with cache:
            info = step_runs.fit_step(job, ctx, step, index, data, cache=cache, val_teacher=val_teacher)
        scores = evaluate(student, val, dev, teacher=side.model if val_teacher is None else None,
                          teacher_logits=val_teacher)
        row = {"index": index, "kind": "distill", "method": step.loss.type,
               **lm_report.model_row(student, scores, prompt, tok.pad_token_id),
               "data": {"sequences": data.n, "tokens": data.tokens(),
                        **({"generated_by_step": source} if source is not None else {"dataset_id": ds_id}),
                        "on_policy": step.on_policy, **info}}
        rows.append(row)
        reporter.event("step_finished", f"step {index} finished: held-out perplexity {scores['perplexity']:.3f} "
                       f"(teacher {teacher_scores['perplexity']:.3f}), agreement {scores['agreement']:.3f}",
                       data={"step_index": index, **scores})
        failed = step_runs.gate_check(step, index, row, teacher_scores, reporter)
    if ctx.student is not student:  # a prune step rebuilt it smaller
        from engine.lm.students import describe

        student = ctx.student
        architecture = {**architecture, **describe(student)}
    baseline_row = None
    if job.baseline and failed is None:
        baseline_row = step_runs.run_baseline(job, ctx, student, init_state, step_data, prompt, tok, val_teacher)
    ctx.check_stop("before the exports")
    shipped = student if failed is None else passing  # a broken gate ships the last step that passed, if any
    if shipped is not None:
        artifacts += step_runs.write_exports(job, shipped, tok, val, out_dir, work, reporter)
    teacher_row = side.row(teacher_scores, prompt, tok.pad_token_id)
    passed_rows = rows if failed is None else rows[:-1]
    final = ({k: v for k, v in passed_rows[-1].items() if k not in ("index", "kind", "method", "data", "gate")}
             if passed_rows else dict(teacher_row))
    report = build_report(teacher=teacher_row, steps=rows, student=final, architecture=architecture,
                          reproducibility={"seed": job.seed, "versions": versions(), "spec_sha256": spec_sha256(spec),
                                           "teacher_sha256": (teacher.sha256 or file_sha256(Path(teacher.path)))
                                           if side.model is not None else None,
                                           "datasets_sha256": {k: s.sha256 or file_sha256(Path(s.path))
                                                               for k, s in sources.items() if k in records},
                                           "device": str(dev), "threads": torch.get_num_threads()},
                          data={"task": "causal_lm", "architecture": side.name,
                                "records": {k: len(r) for k, (_, r) in records.items()},
                                "record_kind": {k: kind for k, (kind, _) in records.items()},
                                "train_sequences": step_data[0][2].n, "val_sequences": val.n,
                                "val_tokens": val.tokens(), "val_source": val_source,
                                "max_seq_len": first.max_seq_len, "vocab_size": len(tok)})
    report["recipe"] = list(spec.get("steps") or [])
    report["samples"] = lm_report.samples(side, student, tok, val, dev)
    if failed is not None:
        report["gate"] = failed
        if not passed_rows:
            report["student"] = None
    metrics: dict[str, Any] = {"teacher": {k: teacher_row[k] for k in ("perplexity", "nll") if k in teacher_row},
                               "student": {k: final[k] for k in lm_report.LM_METRICS if k in final}}
    if baseline_row is not None:
        report["baseline"] = baseline_row
        report["teacher_gain"] = {k: float(final[k]) - float(baseline_row[k]) for k in lm_report.LM_METRICS
                                  if k in final and k in baseline_row}
        metrics["baseline"] = {k: baseline_row[k] for k in lm_report.LM_METRICS if k in baseline_row}
        metrics["teacher_gain"] = report["teacher_gain"]
    try:
        artifacts += lm_report.history_plot(ctx.history, out_dir)
        artifacts.append(lm_report.write_model_card(report, spec, out_dir))
    except Exception as exc:  # noqa: BLE001 - the card and plots are extras; never fail a job over them
        reporter.event("report", f"model card / plots skipped: {error_summary(exc)}", level="warning")
    artifacts.append(write_report(report, out_dir))
    if failed is not None:
        result = EngineResult(artifacts=artifacts, metrics=metrics, report=report)
        raise QualityGateFailed(failed["message"], result)
    ratios = (f", {report['parameter_ratio']:.2f}x fewer parameters, {report['speedup']:.2f}x faster generation "
              "(batch 32)" if report.get("speedup") and report.get("parameter_ratio") else "")
    reporter.event("report", f"report written: student perplexity {final['perplexity']:.3f} (teacher "
                   f"{teacher_row['perplexity']:.3f}){ratios}",
                   data={"compression_ratio": report["compression_ratio"], "speedup": report["speedup"]})
    return EngineResult(artifacts=artifacts, metrics=metrics, report=report)


