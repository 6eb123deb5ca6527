"""The training loop shared by step kinds: :func:`fit` trains ``ctx.student`` for one step.

Batches are taken from the step's :class:`~engine.training.tables.Table` by a per-epoch permutation
drawn from the job's seeded ``torch.Generator`` (no DataLoader). Teacher outputs come from the step's
:class:`~engine.training.tables.TeacherCache` unless the step augments its inputs: then the teacher runs
on the same augmented batch as the student every step ("consistent teaching").

The pieces live next to this module: the state (:mod:`.context`), the data (:mod:`.tables`), progress
(:mod:`.progress`), augmentation (:mod:`.augment`), hint features (:mod:`.features`), early stopping
(:mod:`.early_stopping`) and the optimizer schedule (:mod:`.optim`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InvalidSpec, TrainingDiverged
from engine.training.augment import augment_batch
from engine.training.context import TrainContext
from engine.training.early_stopping import EarlyStopping, metric_value
from engine.training.features import StudentFeatures, probe_hint_losses
from engine.training.optim import Scheduler
from engine.training.plan import TrainingPlan
from engine.training.tables import StepData

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def label_loss(task: str) -> LossFn:
    """The baseline's loss: cross-entropy (classification) or MSE (regression) against labels."""

    def loss(s: torch.Tensor, _t: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
        assert y is not None
        if task == "classification":
            return F.cross_entropy(s.float(), y)
        return F.mse_loss(s.float(), y.float().reshape(s.shape))

    return loss


def teacher_targets(ctx: TrainContext, data: StepData, idx: torch.Tensor, xs: list[torch.Tensor], *,
                    augmented: bool, features: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The teacher's outputs [B, D] and hint features ``{name: [B, ...]}`` for the batch ``idx``: run on
    the (augmented) inputs ``xs`` when the step augments, else read from the step's cache."""
    if augmented:
        batch = data.table.batch_dict(xs)
        out = ctx.teacher(batch)
        feats = ctx.teacher.features(batch, features) if features else {}
        # made in inference mode: losses that save them for backward (hint MSE) need normal tensors
        return out, {k: f.clone() for k, f in feats.items()}
    assert data.cache is not None
    return data.cache.take(idx)


def compute_loss(loss_fn: LossFn, s_out: torch.Tensor, t_out: torch.Tensor | None, y: torch.Tensor | None,
                 mix: tuple[torch.Tensor, float] | None, hints: Sequence[Any], hint_modules: Sequence[nn.Module],
                 student_features: StudentFeatures | None, t_feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The step's loss on one batch: ``loss_fn(student [B, D], teacher [B, D] or None, labels [B] or None)``
    (mixed as the inputs were when mixup mixed rows) plus each hint's weighted feature loss."""
    if mix is not None and y is not None:
        perm, lam = mix
        loss = lam * loss_fn(s_out, t_out, y) + (1 - lam) * loss_fn(s_out, t_out, y[perm])
    else:
        loss = loss_fn(s_out, t_out, y)
    for h, hm in zip(hints, hint_modules):
        loss = loss + h.weight * hm(student_features.got[h.student].float(), t_feats[h.teacher])  # type: ignore[union-attr]
    return loss


def fit(ctx: TrainContext, step: TrainingPlan, step_index: int, *, after_step: Callable[[nn.Module], None] | None = None,
        epoch_offset: int = 0, total_epochs: int | None = None, resumable: bool = False) -> None:
    """Train ``ctx.student`` for one step (see module docstring). Records history and step info.

    ``after_step(model)`` runs after every optimizer step (e.g. :func:`.prune.reapply_masks` keeping
    pruned weights at zero); ``epoch_offset`` numbers the epochs of repeated fine-tunes in one step and
    ``total_epochs`` is that step's epoch count for progress. ``resumable``: this call is the whole
    training of a step, so with ``ctx.checkpoint`` it checkpoints after epochs and continues from a
    saved epoch (student, optimizer, schedule, early stopping, hint adapters, RNG states).
    """
    from engine.training import checkpoint as checkpoints

    ckpt = ctx.checkpoint if resumable else None
    resume = ckpt.fit_resume(step_index) if ckpt is not None else None
    baseline = ctx.baseline
    hints = [] if baseline else list(step.hints)
    augment = step.augment if (step.augment is not None and step.augment.active) else None
    teacher_feats = list(dict.fromkeys(h.teacher for h in hints))
    data = ctx.step_data(step, step_index, teacher_feats)
    model = ctx.student
    dev = ctx.device
    n = data.table.n
    bs = min(step.config.batch_size, n)
    loss_fn: Callable = label_loss(ctx.task) if baseline else step.loss
    if baseline and data.labels is None:
        raise InvalidSpec(f"baseline: step {step_index} has no labels to train on")

    # hints: student hooks + adapters sized by one probe batch
    sfeat = StudentFeatures(model, [h.student for h in hints]) if hints else None
    hint_modules: list[nn.Module] = []
    try:
        if hints:
            hint_modules = probe_hint_losses(ctx, step, data, sfeat, teacher_feats)  # type: ignore[arg-type]
        params = list(model.parameters()) + [p for m in hint_modules for p in m.parameters()]
        optimizer = step.optimizer.create([p for p in params if p.requires_grad])
        epochs = step.config.epochs
        steps_per_epoch = math.ceil(n / bs)
        sched = Scheduler(optimizer, step.schedule, epochs * steps_per_epoch, epochs=epochs)
        stopper = EarlyStopping(step.early_stopping, ctx.task, ctx.y_val is not None, schedule=step.schedule,
                                epochs=epochs)
        use_amp = dev.type == "cuda"
        lrs: list[float] = []
        lr_cuts: list[int] = []
        kind = "baseline" if baseline else step.name
        prefix = "baseline_" if baseline else ctx.metric_prefix
        start_epoch, stopped, epoch = 1, False, 0
        if resume is not None:
            restored = checkpoints.restore_fit(resume, model=model, hint_modules=hint_modules, optimizer=optimizer,
                                               scheduler=sched, generator=ctx.generator, device=dev)
            if restored is None:
                ctx.reporter.event("checkpoint", f"step {step_index}: the saved training state does not fit this "
                                   "step; training it from its start", level="warning", data={"step": step_index})
            else:
                epoch, stopped = restored["epoch"], restored["stopped"]
                start_epoch = epoch + 1
                stopper.best, stopper.bad_epochs, lrs = restored["best"], restored["bad_epochs"], restored["lrs"]
        last_epoch = epoch if stopped else epochs
        for epoch in range(start_epoch, last_epoch + 1):
            started = time.perf_counter()
            model.train()
            for m in hint_modules:
                m.train()
            order = torch.randperm(n, generator=ctx.generator)
            if not data.table.lazy:
                order = order.to(dev)
            loss_sum = torch.zeros((), device=dev)
            for start in range(0, n, bs):
                ctx.check_stop(f"during step {step_index}, epoch {epoch}")
                idx = order[start:start + bs]
                xs = data.table.take(idx)
                y = data.labels[idx.to(data.labels.device)] if data.labels is not None else None
                mix = None
                if augment is not None:
                    xs, mix = augment_batch(xs, augment, ctx.generator)
                t_out: torch.Tensor | None = None
                t_feats: dict[str, torch.Tensor] = {}
                if not baseline:
                    t_out, t_feats = teacher_targets(ctx, data, idx, xs, augmented=augment is not None,
                                                     features=teacher_feats)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    s_out = model(*xs).float()
                    loss = compute_loss(loss_fn, s_out, t_out, y, mix, hints, hint_modules, sfeat, t_feats)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if step.config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, step.config.grad_clip)
                optimizer.step()
                if after_step is not None:
                    after_step(model)
                lrs.append(sched.lr)
                sched.step()
                loss_sum += loss.detach() * idx.shape[0]
            train_loss = float(loss_sum) / n
            if not math.isfinite(train_loss):
                raise TrainingDiverged(f"training diverged in step {step_index}, epoch {epoch} (loss is {train_loss}); "
                                       "try a lower learning rate or set grad_clip")
            outputs = ctx.predict()
            metrics = ctx.evaluate(outputs)
            val_loss = float("nan")
            if stopper.active:  # watched (metric "loss") or the tie-break of an unchanged metric
                with torch.no_grad():
                    val_loss = float(loss_fn(outputs, ctx.t_val, ctx.y_val))
            rep = ctx.reporter
            epoch_no = epoch + epoch_offset
            rep.metric(step=step_index, epoch=epoch_no, name=f"{'baseline_' if baseline else ''}train_loss", value=train_loss)
            for k, v in metrics.items():
                rep.metric(step=step_index, epoch=epoch_no, name=f"{prefix}{k}", value=v)
            ctx.history.append({"step": step_index, "epoch": epoch_no, "train_loss": train_loss, "lr": lrs[-1],
                                "baseline": baseline, **metrics})
            ctx.progress.epoch_done(step_index=step_index, step_kind=kind, epoch=epoch_no,
                                    epochs=total_epochs or epochs,
                                    seconds=time.perf_counter() - started)
            if stopper.active and stopper.update(metric_value(stopper.metric, metrics, val_loss), epoch, model,
                                                 val_loss):
                ctx.progress.skip(epochs - epoch)
                rep.event("early_stopping", f"step {step_index}: no improvement of {stopper.metric} for "
                          f"{stopper.config.patience} epochs; stopped after epoch {epoch}",
                          data={"step": step_index, "epoch": epoch, "metric": stopper.metric})
                stopped = True
            elif sched.epoch_end(stopper.improved):
                lr_cuts.append(epoch)
                rep.event("lr_reduced", f"step {step_index}: {stopper.metric} has not improved for {sched.patience} "
                          f"epochs; learning rate × {step.schedule.factor} → {sched.lr:.3g} after epoch {epoch}",
                          data={"step": step_index, "epoch": epoch, "lr": sched.lr})
            if ckpt is not None:
                ckpt.epoch_end(step_index, epoch, functools.partial(
                    checkpoints.fit_state, model=model, hint_modules=hint_modules, optimizer=optimizer,
                    scheduler=sched, best=stopper.best, bad_epochs=stopper.bad_epochs, stopped=stopped, epoch=epoch,
                    lrs=lrs, generator=ctx.generator))
            if stopped:
                break
        info = ctx.step_info.setdefault(step_index, {})
        info.update(data.info)
        info["lr_first"] = lrs[0] if lrs else None
        info["lr_last"] = lrs[-1] if lrs else None
        info["epochs_run"] = epoch
        if sched.plateau:
            info["schedule"] = {"type": "plateau", "patience": sched.patience, "factor": step.schedule.factor,
                                "lr_cut_after_epochs": lr_cuts, "max_epochs": epochs}
        best = stopper.best
        if best is not None:
            model.load_state_dict(best[2])
            info["early_stopping"] = {"metric": stopper.metric, "best_epoch": best[1], "best_value": best[0],
                                      "epochs_run": epoch}
            ctx.reporter.event("early_stopping", f"step {step_index}: restored the weights of epoch {best[1]} "
                               f"({stopper.metric} {best[0]:.4f})", data=info["early_stopping"])
    finally:
        if sfeat is not None:
            sfeat.close()
