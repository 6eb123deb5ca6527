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
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

import jobspec
from engine.errors import (Cancelled, EngineError, ExportFailed, InvalidDataset, InvalidSpec, QualityGateFailed,
                           Unsupported, error_summary)
from engine import registry
from engine.lm import model_dir, report as lm_report, text_data
from engine.lm.components import LM_EXPORTERS
from engine.lm.teachers import LocalTeacher, ServedTeacher
from engine.lm.training import LMContext, evaluate, fill_cache, fit_lm
from engine.report.rows import build_report, file_sha256, spec_sha256, versions, write_report
from engine.training.progress import ProgressTracker
from engine.values import ArtifactFile, DatasetSource, EngineResult, ModelSource, Reporter, TeacherSource
from jobspec.base import validation_message
from jobspec.rules import with_task_defaults


def _sources(job: jobspec.JobSpec, datasets: Any) -> dict[str, DatasetSource]:
    if isinstance(datasets, DatasetSource):
        return {job.dataset_id or "dataset": datasets}
    return dict(datasets or {})


def _records(job: jobspec.JobSpec, sources: Mapping[str, DatasetSource]) -> dict[str, tuple[str, list[dict]]]:
    out = {}
    for ds_id in job.dataset_ids():
        if ds_id not in sources:
            raise InvalidSpec(f"dataset {ds_id!r} was not provided")
        src = sources[ds_id]
        if src.format != "jsonl":
            raise InvalidDataset(f"dataset {ds_id}: a causal_lm teacher trains on text; upload it as 'jsonl' "
                                 f"records (this one is {src.format})")
        try:
            out[ds_id] = text_data.read_records(Path(src.path))
        except EngineError as exc:
            raise InvalidDataset(f"dataset {ds_id}: {exc.message}") from None
    return out


def _student(job: jobspec.JobSpec, teacher: Any, teacher_digest: str, models: Mapping[str, ModelSource] | None,
             work: Path) -> tuple[Any, dict[str, Any]]:
    from engine.lm import students

    s = job.student
    if isinstance(s, jobspec.DerivedStudent):
        model = students.derive_student(teacher, depth=s.derive.depth, width=s.derive.width)
        how = {"derive": s.derive.model_dump()}
    elif isinstance(s, jobspec.students.HFCausalLMStudent):
        model = registry.students.build(s).create_lm(teacher)
        how = {"family": "hf_causal_lm", "config": dict(s.config)}
    elif isinstance(s, jobspec.UploadedStudent):
        if not models or s.model_id not in models:
            raise InvalidSpec(f"student model {s.model_id!r} was not provided")
        directory = model_dir.unpack(Path(models[s.model_id].path), work / "student")
        if model_dir.tokenizer_digest(model_dir.load_tokenizer(directory)) != teacher_digest:
            raise InvalidSpec("the student's tokenizer differs from the teacher's: token-level KD compares "
                              "distributions over the same tokens")
        model = model_dir.load_causal_lm(directory)
        how = {"model_id": s.model_id}
    else:
        raise InvalidSpec("a causal_lm job needs a student: {\"derive\": {\"depth\": 0.5}}, "
                          "{\"family\": \"hf_causal_lm\", \"config\": {...}} or an uploaded hf_transformers model")
    return model.float().train(), {**how, **students.describe(model)}


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
    sources = _sources(job, datasets)
    records = _records(job, sources)
    facts = jobspec.Facts(task=teacher.task, teacher_format=teacher.format,
                          labelled={k: kind != "prompt" for k, (kind, _) in records.items()},
                          kinds={k: kind for k, (kind, _) in records.items()})
    try:
        if teacher.format == "endpoint":
            side, tok, student, architecture = _served(job, facts, Path(teacher.path), models, work, records)
        else:
            teacher_dir = model_dir.unpack(Path(teacher.path), work / "teacher")
            tmodel = model_dir.load_causal_lm(teacher_dir)
            tok = model_dir.load_tokenizer(teacher_dir)
            digest = model_dir.tokenizer_digest(tok)
            _check(job, dataclasses.replace(facts, tokenizers={job.teacher_model_id: digest}))
            tmodel = tmodel.to(dev)
            for p in tmodel.parameters():
                p.requires_grad_(False)
            torch.manual_seed(job.seed)
            student, architecture = _student(job, tmodel, digest, models, work)
            side = LocalTeacher(tmodel, dev)
        student = student.to(dev)
        reporter.event("validate", f"teacher {side.name}; student {architecture['parameters']:,} parameters "
                       f"({architecture.get('layers')} layers)",
                       data={"teacher": side.name, "student": architecture,
                             "datasets": {k: {"records": len(r), "kind": kind} for k, (kind, r) in records.items()}})
        return _run(job, spec, teacher, sources, records, tok, side, student, architecture, out_dir, reporter, dev)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check(job: jobspec.JobSpec, facts: jobspec.Facts) -> None:
    for problem in jobspec.conflicts(job, facts):
        raise (Unsupported if problem.unsupported else InvalidSpec)(str(problem))


def _served(job: jobspec.JobSpec, facts: jobspec.Facts, config: Path, models: Mapping[str, ModelSource] | None,
            work: Path, records: Mapping[str, tuple[str, list[dict]]]) -> tuple[Any, Any, Any, dict[str, Any]]:
    """A served teacher: the uploaded student and its tokenizer, checked against the endpoint's on sample text."""
    from engine.lm import students
    from engine.lm.endpoint import EndpointTeacher

    _check(job, facts)
    s = job.student
    if not isinstance(s, jobspec.UploadedStudent) or not models or s.model_id not in models:
        raise InvalidSpec("a served teacher needs an uploaded student ('student': {\"model_id\": ...})")
    directory = model_dir.unpack(Path(models[s.model_id].path), work / "student")
    tok = model_dir.load_tokenizer(directory)
    student = model_dir.load_causal_lm(directory).float().train()
    endpoint = EndpointTeacher(config, tok)
    if any(isinstance(st, jobspec.DistillStep) and job.generated_for(i) is None for i, st in enumerate(job.steps)):
        texts = [r.get("text") or r.get("prompt") or "" for _, rows in records.values() for r in rows[:4]]
        endpoint.check_tokenizer([t for t in texts if t])
    return ServedTeacher(endpoint), tok, student, {"model_id": s.model_id, **students.describe(student)}


def _split(job: jobspec.JobSpec, records: Mapping[str, tuple[str, list[dict]]]
           ) -> tuple[str, list[dict], dict[str, list[dict]], str]:
    """(kind, held-out records, training records per dataset id, where the held-out records come from)."""
    train = {k: r for k, (_, r) in records.items()}
    if job.eval_dataset_id:
        kind, val = records[job.eval_dataset_id]
        return kind, val, train, f"eval dataset {job.eval_dataset_id}"
    main_id = job.heldout_dataset_id()
    kind, rows = records[main_id]
    tr, val = text_data.split_records(rows, job.val_fraction, job.seed)
    train[main_id] = tr
    return kind, val, train, f"{len(val)} of {len(rows)} records held out (seed {job.seed})"


def _run(job: jobspec.JobSpec, spec: Mapping[str, Any], teacher: TeacherSource, sources: Mapping[str, DatasetSource],
         records: Mapping[str, tuple[str, list[dict]]], tok: Any, side: Any, student: Any,
         architecture: dict[str, Any], out_dir: Path, reporter: Reporter, dev: torch.device) -> EngineResult:
    work = out_dir / "work"
    val_kind, val_records, train_records, val_source = _split(job, records)
    distills = [s for s in job.steps if isinstance(s, jobspec.DistillStep)]
    first = distills[0]
    generates = [s for s in job.steps if isinstance(s, jobspec.GenerateStep)]
    if val_kind == "prompt" and generates:
        # Held-out prompts are scored on the teacher's own completions, as the steps train on them.
        val_records = side.complete(tok, [r["prompt"] for r in val_records], generates[0], job.seed,
                                    first.max_seq_len // 2, _stop(reporter))
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
    total_epochs = sum(_epochs(s) for s in job.steps) * (2 if job.baseline else 1)
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
            generated[index] = _generate(step, index, train_records[ds_id], tok, side, job.seed, out_dir,
                                         reporter, progress, artifacts)
            continue
        if isinstance(step, jobspec.PruneStep | jobspec.QuantizeStep):
            calib = text_data.tokenize(tok, records[ds_id][0], train_records[ds_id], first.max_seq_len)
            row = _compress(job, ctx, step, index, calib, val_teacher, prompt, tok, work)
            rows.append(row)
            failed = _gate(step, index, row, teacher_scores, reporter)
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
            info = _fit(job, ctx, step, index, data, cache=cache, val_teacher=val_teacher)
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
        failed = _gate(step, index, row, teacher_scores, reporter)
    if ctx.student is not student:  # a prune step rebuilt it smaller
        from engine.lm.students import describe

        student = ctx.student
        architecture = {**architecture, **describe(student)}
    baseline_row = None
    if job.baseline and failed is None:
        baseline_row = _baseline(job, ctx, student, init_state, step_data, prompt, tok, val_teacher)
    ctx.check_stop("before the exports")
    shipped = student if failed is None else passing  # a broken gate ships the last step that passed, if any
    if shipped is not None:
        artifacts += _exports(job, shipped, tok, val, out_dir, work, reporter)
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


def _gate(step: Any, index: int, row: dict[str, Any], teacher: Mapping[str, float], reporter: Reporter
          ) -> dict[str, Any] | None:
    """Check the step's gate into ``row["gate"]``; the failure (``report["gate"]``) when it broke, else None.
    ``perplexity``: the relative increase over the teacher's; ``agreement``: 1 − top-1 token agreement."""
    gate = getattr(step, "gate", None)
    if gate is None:
        return None
    if gate.metric == "perplexity":
        value, reference = float(row["perplexity"]), float(teacher["perplexity"])
        drop = value / reference - 1.0
    else:
        value, reference = float(row["agreement"]), 1.0
        drop = reference - value
    passed = drop <= gate.max_drop + 1e-12
    row["gate"] = {"metric": gate.metric, "teacher": reference, "value": value, "drop": drop,
                   "max_drop": float(gate.max_drop), "passed": passed}
    if passed:
        return None
    what = "perplexity rose" if gate.metric == "perplexity" else "agreement dropped"
    message = (f"step {index} ({step.kind}): {what} {drop:.3f} against the teacher's (allowed {gate.max_drop:.3f})")
    failed = {"failed_step": index, "metric": gate.metric, "drop": drop, "max_drop": float(gate.max_drop),
              "message": message}
    reporter.event("quality_gate", message, level="error", data=failed)
    return failed


def _epochs(step: Any) -> int:
    """Epochs a step trains for (a prune step's fine-tune; none for quantize and generate)."""
    if isinstance(step, jobspec.DistillStep):
        return step.epochs
    finetune = getattr(step, "finetune", None)
    return finetune.epochs if isinstance(step, jobspec.PruneStep) and finetune is not None else 0


def _compress(job: jobspec.JobSpec, ctx: LMContext, step: Any, index: int, calib: text_data.TokenBlocks,
              val_teacher: Any, prompt: Any, tok: Any, work: Path) -> dict[str, Any]:
    """A prune (MLP channels, Wanda-ranked on the job's text, then the optional KD fine-tune) or quantize
    (dynamic int8) step on the student; its report row. After ``dynamic_int8`` the delivered files stay the float
    weights: quantizing them at load (``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, torch.qint8)``,
    a pure function of the weights) gives exactly the model this row measured; ``gguf`` q8_0 is the int8 file."""
    from engine.lm import compress

    ctx.progress.step_started(step_index=index, step_kind=step.kind, epochs=_epochs(step))
    ctx.reporter.event("step_started", f"step {index}: {step.kind} {step.method}",
                       data={"step_index": index, "kind": step.kind})
    extra: dict[str, Any] = {}
    if isinstance(step, jobspec.PruneStep):
        pruned, facts = compress.prune_mlp_channels(ctx.student, step.amount, calibration=calib.select(
            torch.arange(min(calib.n, 32))))
        ctx.student = pruned.to(ctx.device)
        extra["prune"] = {k: v for k, v in facts.items() if k != "kept_units"}
        ctx.reporter.event("prune", f"step {index}: {facts['intermediate_before']} → {facts['intermediate_after']} "
                           f"MLP units per layer ({facts['criterion']})", data=extra["prune"])
        if step.finetune is not None:
            ft = step.finetune
            tune = jobspec.DistillStep(loss=ft.loss, epochs=ft.epochs, batch_size=ft.batch_size,
                                       optimizer=ft.optimizer, schedule=ft.schedule, grad_clip=ft.grad_clip,
                                       max_seq_len=int(calib.input_ids.shape[1]))
            with fill_cache(ctx.teacher, calib, registry.losses.build(ft.loss), ctx.device, work / f"cache{index}",
                            ctx.check_stop) as cache:
                extra["finetune"] = _fit(job, ctx, tune, index, calib, cache=cache, val_teacher=val_teacher)
        model = ctx.student
        scores = evaluate(model, ctx.val, ctx.device, teacher=ctx.teacher if val_teacher is None else None,
                          teacher_logits=val_teacher)
        row = lm_report.model_row(model, scores, prompt, tok.pad_token_id)
    else:
        quantized, facts = compress.quantize_dynamic_int8(ctx.student)
        cpu = torch.device("cpu")
        scores = evaluate(quantized, ctx.val, cpu, teacher_logits=val_teacher)
        row = lm_report.model_row(quantized, scores, prompt, tok.pad_token_id)
        row["size_bytes"] = compress.quantized_size_bytes(quantized)
        extra["quantization"] = {**facts, "notes": "dynamic int8 (torch.ao) of every Linear, measured on the CPU; "
                                 "the files hold the float weights: quantize them at load with "
                                 "torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, torch.qint8) to get "
                                 "exactly this model, or take the gguf q8_0 export"}
    ctx.reporter.event("step_finished", f"step {index} finished: held-out perplexity {scores['perplexity']:.3f}",
                       data={"step_index": index, **scores})
    return {"index": index, "kind": step.kind, "method": step.method, **row, **extra,
            "data": {"calibration_sequences": min(calib.n, 32)}}


def _fit(job: jobspec.JobSpec, ctx: LMContext, step: jobspec.DistillStep, index: int, data: text_data.TokenBlocks,
         **kw: Any) -> dict[str, Any]:
    """One distill step: in this process, or data-parallel over ``job.devices`` processes (:mod:`.distributed`)."""
    if job.devices > 1:
        from engine.lm.distributed import fit_lm_ddp

        return fit_lm_ddp(ctx, step, index, data, devices=job.devices, **kw)
    return fit_lm(ctx, step, index, data, **kw)


def _stop(reporter: Reporter) -> Any:
    def check(where: str) -> None:
        if reporter.should_stop():
            raise Cancelled(f"cancelled {where}")
    return check


def _generate(step: jobspec.GenerateStep, index: int, prompts: list[dict], tok: Any, side: Any, seed: int,
              out_dir: Path, reporter: Reporter, progress: ProgressTracker,
              artifacts: list[ArtifactFile]) -> list[dict[str, str]]:
    """Run a generate step: the teacher's completions of the prompts, also delivered as ``generated-step{i}.jsonl``."""
    progress.step_started(step_index=index, step_kind="generate", epochs=0)
    started = time.perf_counter()
    records = side.complete(tok, [r["prompt"] for r in prompts], step, seed + index, 1024, _stop(reporter))
    path = out_dir / f"generated-step{index}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    artifacts.append(ArtifactFile("dataset", "jsonl", path, index, "application/jsonl"))
    reporter.event("generate", f"step {index}: the teacher wrote {len(records)} completions for {len(prompts)} "
                   f"prompts in {time.perf_counter() - started:.1f}s",
                   data={"step_index": index, "prompts": len(prompts), "completions": len(records),
                         "seconds": time.perf_counter() - started,
                         "mean_characters": sum(len(r["completion"]) for r in records) / max(1, len(records))})
    return records


def _baseline(job: jobspec.JobSpec, ctx: LMContext, student: Any, init_state: Any, step_data: list[Any], prompt: Any,
              tok: Any, val_teacher: Any) -> dict[str, Any]:
    """The same student from the same initial weights, trained on the data's tokens alone, same steps and budget."""
    ctx.reporter.event("baseline", "training the same student on the data alone (same steps, epochs, optimizer, "
                       "seed)")
    twin = copy.deepcopy(student)
    twin.load_state_dict(init_state)
    bctx = LMContext(student=twin.train(), teacher=ctx.teacher, val=ctx.val, device=ctx.device, reporter=ctx.reporter,
                     progress=ctx.progress, generator=torch.Generator().manual_seed(job.seed), work_dir=ctx.work_dir,
                     history=ctx.history)
    for index, step, data in step_data:
        _fit(job, bctx, step, index, data, cache=None, val_teacher=val_teacher, baseline=True)
    scores = evaluate(twin, ctx.val, ctx.device, teacher=ctx.teacher if val_teacher is None else None,
                      teacher_logits=val_teacher)
    ctx.reporter.event("baseline", f"baseline finished: held-out perplexity {scores['perplexity']:.3f}", data=scores)
    return lm_report.model_row(twin, scores, prompt, tok.pad_token_id)


def _exports(job: jobspec.JobSpec, student: Any, tok: Any, val: text_data.TokenBlocks, out_dir: Path, work: Path,
             reporter: Reporter) -> list[ArtifactFile]:
    """Write and verify each requested export of the final student (:data:`engine.lm.components.LM_EXPORTERS`)."""
    model = copy.deepcopy(student).to("cpu").float().eval()
    example = val.input_ids[: min(2, val.n), : min(32, val.input_ids.shape[1])]
    out: list[ArtifactFile] = []
    for fmt in job.exports:
        started = time.perf_counter()
        try:
            files, check = LM_EXPORTERS[fmt]().write_lm(model, tok, example, out_dir, work, len(job.steps) - 1)
        except EngineError:
            raise
        except Exception as exc:
            raise ExportFailed(f"{fmt} export failed: {error_summary(exc)}") from None
        out += files
        reporter.event("export", f"{fmt} written and verified in {time.perf_counter() - started:.2f}s",
                       data={"format": fmt, "verification": _scalars(check)})
    return out


def _scalars(check: Mapping[str, Any], depth: int = 0) -> dict[str, Any]:
    """The scalar facts of an export's verification (numbers, short strings), nested one level: an event is one
    bounded line on the executor's pipe, so lists of tensors stay out of it."""
    out: dict[str, Any] = {}
    for key, value in check.items():
        if isinstance(value, bool | int | float) or value is None:
            out[str(key)] = value
        elif isinstance(value, str):
            out[str(key)] = value[:200]
        elif isinstance(value, Mapping) and depth == 0:
            out[str(key)] = _scalars(value, 1)
    return out
