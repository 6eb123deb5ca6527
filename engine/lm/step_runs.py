"""Running a causal-LM job's steps other than the distill loop itself: generate, prune / quantize, quality gates,
the baseline twin, and the exports (each written and verified)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import jobspec
from engine import registry
from engine.errors import Cancelled, EngineError, ExportFailed, error_summary
from engine.lm import report as lm_report, text_data
from engine.lm.components import LM_EXPORTERS
from engine.lm.training import LMContext, evaluate, fill_cache, fit_lm
from engine.training.progress import ProgressTracker
from engine.values import ArtifactFile, Reporter


def gate_check(step: Any, index: int, row: dict[str, Any], teacher: Mapping[str, float], reporter: Reporter
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


def step_epochs(step: Any) -> int:
    """Epochs a step trains for (a prune step's fine-tune; none for quantize and generate)."""
    if isinstance(step, jobspec.DistillStep):
        return step.epochs
    finetune = getattr(step, "finetune", None)
    return finetune.epochs if isinstance(step, jobspec.PruneStep) and finetune is not None else 0


def run_compress(job: jobspec.JobSpec, ctx: LMContext, step: Any, index: int, calib: text_data.TokenBlocks,
              val_teacher: Any, prompt: Any, tok: Any, work: Path) -> dict[str, Any]:
    """A prune (MLP channels, Wanda-ranked on the job's text, then the optional KD fine-tune) or quantize
    (dynamic int8) step on the student; its report row. After ``dynamic_int8`` the delivered files stay the float
    weights: quantizing them at load (``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, torch.qint8)``,
    a pure function of the weights) gives exactly the model this row measured; ``gguf`` q8_0 is the int8 file."""
    from engine.lm import compress

    ctx.progress.step_started(step_index=index, step_kind=step.kind, epochs=step_epochs(step))
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
                extra["finetune"] = fit_step(job, ctx, tune, index, calib, cache=cache, val_teacher=val_teacher)
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


def fit_step(job: jobspec.JobSpec, ctx: LMContext, step: jobspec.DistillStep, index: int, data: text_data.TokenBlocks,
         **kw: Any) -> dict[str, Any]:
    """One distill step: in this process, or data-parallel over ``job.devices`` processes (:mod:`.distributed`)."""
    if job.devices > 1:
        from engine.lm.distributed import fit_lm_ddp

        return fit_lm_ddp(ctx, step, index, data, devices=job.devices, **kw)
    return fit_lm(ctx, step, index, data, **kw)


def stop_check(reporter: Reporter) -> Any:
    def check(where: str) -> None:
        if reporter.should_stop():
            raise Cancelled(f"cancelled {where}")
    return check


def run_generate(step: jobspec.GenerateStep, index: int, prompts: list[dict], tok: Any, side: Any, seed: int,
              out_dir: Path, reporter: Reporter, progress: ProgressTracker,
              artifacts: list[ArtifactFile]) -> list[dict[str, str]]:
    """Run a generate step: the teacher's completions of the prompts, also delivered as ``generated-step{i}.jsonl``."""
    progress.step_started(step_index=index, step_kind="generate", epochs=0)
    started = time.perf_counter()
    records = side.complete(tok, [r["prompt"] for r in prompts], step, seed + index, 1024, stop_check(reporter))
    path = out_dir / f"generated-step{index}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    artifacts.append(ArtifactFile("dataset", "jsonl", path, index, "application/jsonl"))
    reporter.event("generate", f"step {index}: the teacher wrote {len(records)} completions for {len(prompts)} "
                   f"prompts in {time.perf_counter() - started:.1f}s",
                   data={"step_index": index, "prompts": len(prompts), "completions": len(records),
                         "seconds": time.perf_counter() - started,
                         "mean_characters": sum(len(r["completion"]) for r in records) / max(1, len(records))})
    return records


def run_baseline(job: jobspec.JobSpec, ctx: LMContext, student: Any, init_state: Any, step_data: list[Any], prompt: Any,
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
        fit_step(job, bctx, step, index, data, cache=None, val_teacher=val_teacher, baseline=True)
    scores = evaluate(twin, ctx.val, ctx.device, teacher=ctx.teacher if val_teacher is None else None,
                      teacher_logits=val_teacher)
    ctx.reporter.event("baseline", f"baseline finished: held-out perplexity {scores['perplexity']:.3f}", data=scores)
    return lm_report.model_row(twin, scores, prompt, tok.pad_token_id)


def write_exports(job: jobspec.JobSpec, student: Any, tok: Any, val: text_data.TokenBlocks, out_dir: Path, work: Path,
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
