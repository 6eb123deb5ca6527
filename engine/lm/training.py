"""Training and scoring a causal LM student: token-level KD (or the data alone, for the baseline twin).

:func:`fit_lm` runs one ``distill`` step over :class:`~engine.lm.text_data.TokenBlocks`: AdamW (or the step's
optimizer) with the step's warm-up schedule, gradient accumulation, optional gradient checkpointing, bf16 autocast
on CUDA, the step's gradient clipping. Teacher targets come from a :class:`~engine.lm.divergence.TeacherCache`
filled once before the first epoch (the data is fixed), so the teacher runs once per sequence, not once per epoch.
After every epoch the student is scored on the held-out blocks (:func:`evaluate`) and the weights with the lowest
held-out perplexity are restored at the end of the step.

Shapes: a batch is ``input_ids`` [B, L]; position t of the logits predicts token t+1, so losses compare
``logits[:, :-1]`` with ``input_ids[:, 1:]`` where ``target_mask[:, 1:]`` holds.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.errors import Cancelled, TrainingDiverged
from engine.lm import divergence
from engine.lm.generation import on_policy_batch
from engine.lm.text_data import TokenBlocks
from engine.registry import losses, optimizers
from engine.training.optim import Scheduler
from engine.training.progress import ProgressTracker
from engine.values import Reporter
from jobspec import DistillStep

#: Sequences per teacher / evaluation forward pass.
EVAL_BATCH = 16
#: Most bytes of held-out teacher logits kept for every epoch's scoring.
VAL_LOGITS_LIMIT = 512 << 20


@dataclass
class LMContext:
    """What a step trains with: the student, the teacher (a causal LM in eval mode), the held-out blocks, and
    where events, progress and cached teacher targets go."""

    student: Any
    teacher: Any
    val: TokenBlocks
    device: torch.device
    reporter: Reporter
    progress: ProgressTracker
    generator: torch.Generator
    work_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    eos_id: int | None = None
    pad_id: int = 0

    def check_stop(self, where: str) -> None:
        if self.reporter.should_stop():
            raise Cancelled(f"cancelled {where}")


def shifted(blocks: TokenBlocks, rows: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                           torch.Tensor]:
    """(input_ids [B, L], attention_mask [B, L], labels [B, L-1] with -100 off target, mask [B, L-1] bool)."""
    b = blocks.select(rows)
    ids, att = b.input_ids.to(device), b.attention_mask.to(device)
    mask = (b.target_mask[:, 1:] & b.attention_mask[:, 1:].bool()).to(device)
    labels = ids[:, 1:].masked_fill(~mask, -100)
    return ids, att, labels, mask


def logits_of(model: Any, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, L-1, V] as float32 (autocast to bf16 on CUDA)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
        out = model(input_ids=ids, attention_mask=att, use_cache=False).logits
    return out[:, :-1].float()


def batches(n: int, size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i:i + size] for i in range(0, n, size)]


def fill_cache(teacher: Any, blocks: TokenBlocks, loss: Any, device: torch.device, directory: Path,
               check_stop: Callable[[str], None]) -> divergence.TeacherCache:
    """The teacher's targets (``loss.targets``: at the loss's temperature, top-k or full) for every training
    sequence, computed once."""
    seq = blocks.input_ids.shape[1] - 1
    vocab = int(teacher.get_output_embeddings().weight.shape[0])
    cache = divergence.TeacherCache(blocks.n, seq, vocab=vocab, top_k=loss.config.top_k, directory=directory)
    with torch.no_grad():
        for rows in batches(blocks.n, EVAL_BATCH):
            check_stop("while caching the teacher's outputs")
            ids, att, _, _ = shifted(blocks, rows, device)
            cache.put(rows, loss.targets(logits_of(teacher, ids, att)))
    return cache


def evaluate(model: Any, blocks: TokenBlocks, device: torch.device, teacher: Any = None,
             teacher_logits: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Held-out scores: ``perplexity`` = exp(mean next-token NLL on the targets), ``nll``; with a teacher (or its
    logits per batch of :data:`EVAL_BATCH`, in order) also ``agreement`` (top-1 token agreement) and ``kl``
    (mean per-token KL(teacher ‖ student) at T = 1)."""
    was = model.training
    model.eval()
    nll, tokens, kl, agree = 0.0, 0, 0.0, 0.0
    with torch.no_grad():
        for i, rows in enumerate(batches(blocks.n, EVAL_BATCH)):
            ids, att, labels, mask = shifted(blocks, rows, device)
            logits = logits_of(model, ids, att)
            nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                                           reduction="sum"))
            tokens += int(mask.sum())
            t_logits = teacher_logits[i] if teacher_logits is not None else (
                logits_of(teacher, ids, att) if teacher is not None else None)
            if t_logits is not None:
                m = divergence.token_metrics(logits, t_logits.to(logits.device), mask)
                kl += m["kl_sum"]
                agree += m["agree_sum"]
    model.train(was)
    tokens = max(1, tokens)
    out = {"nll": nll / tokens, "perplexity": math.exp(min(nll / tokens, 50.0)), "tokens": float(tokens)}
    if teacher is not None or teacher_logits is not None:
        out.update({"kl": kl / tokens, "agreement": agree / tokens})
    return out


def teacher_val_logits(teacher: Any, blocks: TokenBlocks, device: torch.device) -> list[torch.Tensor] | None:
    """The teacher's held-out logits per evaluation batch, computed once for every epoch's scoring (CPU copies);
    None when they would take more than :data:`VAL_LOGITS_LIMIT` (a real vocabulary: the teacher then runs again
    at each scoring instead)."""
    vocab = int(teacher.get_output_embeddings().weight.shape[0])
    if blocks.n * (blocks.input_ids.shape[1] - 1) * vocab * 4 > VAL_LOGITS_LIMIT:
        return None
    with torch.no_grad():
        return [logits_of(teacher, *shifted(blocks, rows, device)[:2]).cpu()
                for rows in batches(blocks.n, EVAL_BATCH)]


def batch_loss(model: Any, teacher: Any, kd: Any, data: TokenBlocks, rows: torch.Tensor, cache: Any,
               dev: torch.device, *, live: bool, baseline: bool, eos_id: int | None, pad_id: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss over the target tokens of ``rows``, target mask [b, L-1], attention mask [b, L]).

    ``live``: the continuations are sampled by the student first (on-policy) and the teacher scores them now;
    else the teacher's targets come from ``cache`` (``.get(rows, device)``) or a live pass. ``baseline``:
    cross-entropy on the data's tokens, no teacher. ``model`` may be wrapped (DDP): generation uses ``.module``."""
    ids, att, labels, mask = shifted(data, rows, dev)
    if live:
        ids, att, target = on_policy_batch(getattr(model, "module", model), ids, att, data.target_mask[rows].to(dev),
                                           eos=eos_id, pad=pad_id)
        mask = target[:, 1:] & att[:, 1:].bool()
        labels = ids[:, 1:].masked_fill(~mask, -100)
    logits = logits_of(model, ids, att)
    if baseline:
        # The sum / count rather than F.cross_entropy's mean: a share without targets gives 0, not 0/0.
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")
        return ce / max(1, int(mask.sum())), mask, att
    if cache is not None and not live:
        targets = cache.get(rows, dev)
    else:
        with torch.no_grad():
            targets = kd.targets(logits_of(teacher, ids, att))
    return kd(logits, targets, labels, mask)[0], mask, att


def fit_lm(ctx: LMContext, step: DistillStep, index: int, data: TokenBlocks, *,
           cache: divergence.TeacherCache | None, val_teacher: list[torch.Tensor] | None,
           baseline: bool = False) -> dict[str, Any]:
    """Train ``ctx.student`` on ``data`` for the step's epochs; returns what the step did (epochs, best epoch,
    tokens per second, the loss' parts). ``baseline``: cross-entropy on the data's tokens only (the same student,
    steps and budget without a teacher)."""
    model, dev, kd = ctx.student, ctx.device, losses.build(step.loss)
    model.train()
    if step.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizers.build(step.optimizer).create(params)
    batch = min(step.batch_size, data.n)
    per_epoch = math.ceil(data.n / batch)
    updates = math.ceil(per_epoch / step.grad_accumulation) * step.epochs
    sched = Scheduler(optimizer, step.schedule, updates)
    kind = "baseline" if baseline else "distill"
    prefix = "baseline_" if baseline else ""
    best = (math.inf, 0, None)
    tokens_seen, train_seconds, sampled = 0, 0.0, 0
    coin = torch.Generator().manual_seed(1000 + index)  # its own stream: on_policy leaves the batch order alone
    ctx.progress.step_started(step_index=index, step_kind=kind, epochs=step.epochs)
    for epoch in range(1, step.epochs + 1):
        started = time.perf_counter()
        total, count = 0.0, 0
        epoch_batches = batches(data.n, batch, ctx.generator)
        for bi, rows in enumerate(epoch_batches):
            ctx.check_stop(f"in step {index}, epoch {epoch}")
            live = not baseline and step.on_policy > 0 and float(torch.rand((), generator=coin)) < step.on_policy
            sampled += int(live)
            loss, mask, att = batch_loss(model, ctx.teacher, kd, data, rows, cache, dev, live=live, baseline=baseline,
                                         eos_id=ctx.eos_id, pad_id=ctx.pad_id)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"step {index}, epoch {epoch}: the loss became {float(loss)}; lower the "
                                       f"learning rate (now {step.optimizer.lr}) or set grad_clip")
            (loss / step.grad_accumulation).backward()
            if (bi + 1) % step.grad_accumulation == 0 or bi + 1 == len(epoch_batches):
                if step.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, step.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sched.step()
            total += float(loss.detach()) * int(mask.sum())
            count += int(mask.sum())
            tokens_seen += int(att.sum())
        train_seconds += time.perf_counter() - started
        scores = evaluate(model, ctx.val, dev, teacher=ctx.teacher if val_teacher is None else None,
                          teacher_logits=val_teacher)
        for name in ("perplexity", "agreement", "kl"):
            if name in scores:
                ctx.reporter.metric(step=index, epoch=epoch, name=prefix + name, value=float(scores[name]))
        ctx.reporter.metric(step=index, epoch=epoch, name=prefix + "train_loss", value=total / max(1, count))
        ctx.history.append({"step": index, "epoch": epoch, "kind": kind, "train_loss": total / max(1, count),
                            **{k: v for k, v in scores.items() if k != "tokens"}})
        if scores["nll"] < best[0]:
            best = (scores["nll"], epoch, copy.deepcopy(model.state_dict()) if epoch < step.epochs else None)
        ctx.progress.epoch_done(step_index=index, step_kind=kind, epoch=epoch, epochs=step.epochs,
                                seconds=time.perf_counter() - started)
    if best[2] is not None:  # a later epoch was worse on held-out text: ship the best one
        model.load_state_dict(best[2])
    if step.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.eval()
    return {"epochs": step.epochs, "best_epoch": best[1], "train_tokens_per_second":
            tokens_seen / train_seconds if train_seconds else None, "train_seconds": train_seconds,
            "on_policy_batches": sampled}
