"""Values a distill step leaves to the engine (``"auto"``): the learning rate, the KD temperature, the epochs.

:func:`resolve_auto` runs before the step's training, on the step's own transfer data and teacher cache, and
returns the step config with numbers in place of ``"auto"`` plus the evidence for the report
(``steps[i].auto``):

* ``optimizer.lr: "auto"`` — a learning-rate range test (L. N. Smith, "Cyclical Learning Rates for Training
  Neural Networks", WACV 2017; the ``lr_find`` of fastai): a copy of the student trains for up to
  :data:`RANGE_TEST_STEPS` batches while the lr grows geometrically from :data:`LR_MIN` to :data:`LR_MAX`; the
  loss is smoothed (EMA, bias-corrected) and the test stops once it exceeds 4× its minimum. The chosen lr is the
  one at the smoothed minimum divided by 10 (the rule fastai used for years: the minimum itself is already past
  the stable region).
* ``loss.temperature: "auto"`` (``kd``) — a sweep over :data:`TEMPERATURES`: a copy of the student trains for
  :data:`SWEEP_STEPS` batches on a slice of at most :data:`SWEEP_ROWS` rows per temperature and the one with the
  best held-out headline metric wins (ties: the held-out KD loss at the candidate's own temperature is not
  comparable across temperatures, so the earlier candidate in :data:`TEMPERATURES` wins; 4 — Hinton's usual
  choice — comes first).
* ``epochs: "auto"`` — :data:`jobspec.training.AUTO_EPOCHS` as the upper bound; the ``plateau`` schedule stops
  the step when the held-out metric stops improving (the evidence is the stop itself, filled in after training).

Both searches use a private generator seeded from the job's seed and the step index, so a resumed attempt
chooses the same values and the job's own random stream is not moved.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

import jobspec
from engine.metrics import HIGHER_IS_BETTER, headline_metric
from engine.registry import losses, optimizers
from engine.training.tables import StepData

LR_MIN, LR_MAX = 1e-6, 10.0
RANGE_TEST_STEPS = jobspec.training.AUTO_LR_BATCHES
TEMPERATURES = (4.0, 2.0, 8.0, 1.0)
SWEEP_STEPS = jobspec.training.AUTO_TEMPERATURE_BATCHES // len(TEMPERATURES)
SWEEP_ROWS = 2048
#: the lr a provisional step is built with before the range test replaces it
PROVISIONAL_LR = 3e-3
PROVISIONAL_TEMPERATURE = 4.0


def has_auto(config: jobspec.DistillStep) -> bool:
    return "auto" in (config.epochs, config.optimizer.lr, getattr(config.loss, "temperature", None))


def provisional(config: jobspec.DistillStep) -> jobspec.DistillStep:
    """``config`` with numbers standing in for ``"auto"`` so that its loss and optimizer can be built; the step
    runs with :func:`resolve_auto`'s values, never with these."""
    update: dict[str, Any] = {}
    if config.epochs == "auto":
        update["epochs"] = jobspec.training.AUTO_EPOCHS
    if config.optimizer.lr == "auto":
        update["optimizer"] = config.optimizer.model_copy(update={"lr": PROVISIONAL_LR})
    if getattr(config.loss, "temperature", None) == "auto":
        update["loss"] = config.loss.model_copy(update={"temperature": PROVISIONAL_TEMPERATURE})
    return config.model_copy(update=update) if update else config


def _batches(data: StepData, batch_size: int, gen: torch.Generator, rows: int | None = None):
    """Endless shuffled index batches over the step's table (or its first ``rows`` rows)."""
    n = data.table.n if rows is None else min(rows, data.table.n)
    bs = max(1, min(batch_size, n))
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - bs + 1 if n >= bs else 1, bs):
            yield order[start:start + bs]


def _batch_loss(ctx: Any, data: StepData, idx: torch.Tensor, model: nn.Module, loss_fn: Any) -> torch.Tensor:
    if not data.table.lazy:  # as the training loop indexes: on the device unless the table streams from disk
        idx = idx.to(ctx.device)
    xs = data.table.take(idx)
    y = data.labels[idx.to(data.labels.device)] if data.labels is not None else None
    t_out = None
    if not ctx.baseline:
        if data.cache is not None:
            t_out, _ = data.cache.take(idx)
        else:  # augmented steps have no cache: score the plain inputs
            with torch.no_grad():
                t_out = ctx.teacher(data.table.batch_dict(xs))
    return loss_fn(model(*xs).float(), t_out, y)


def _update(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def lr_range_test(ctx: Any, data: StepData, config: jobspec.DistillStep, loss_fn: Any,
                  gen: torch.Generator) -> dict[str, Any]:
    """Smith's range test on a copy of ``ctx.student``; returns the evidence with ``chosen`` (the lr)."""
    model = copy.deepcopy(ctx.student).train()
    opt_cfg = config.optimizer.model_copy(update={"lr": LR_MIN})
    optimizer = optimizers.build(opt_cfg).create([p for p in model.parameters() if p.requires_grad])
    steps = RANGE_TEST_STEPS
    growth = (LR_MAX / LR_MIN) ** (1.0 / (steps - 1))
    lrs: list[float] = []
    smoothed: list[float] = []
    avg, beta, best = 0.0, 0.9, math.inf
    batches = _batches(data, config.batch_size, gen)
    for i in range(steps):
        lr = LR_MIN * growth ** i
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss = _batch_loss(ctx, data, next(batches), model, loss_fn)
        value = float(loss.detach())
        if not math.isfinite(value):
            break
        avg = beta * avg + (1 - beta) * value
        s = avg / (1 - beta ** (i + 1))
        lrs.append(lr)
        smoothed.append(s)
        best = min(best, s)
        if i > 10 and s > 4 * best:
            break
        _update(optimizer, loss)
    if not smoothed:
        raise RuntimeError("the learning-rate range test diverged at its first batch")
    at_min = lrs[min(range(len(smoothed)), key=smoothed.__getitem__)]
    chosen = float(min(max(at_min / 10.0, 1e-5), 1.0))
    keep = max(1, len(lrs) // 40)  # the curve, thinned for the report
    return {"method": "lr_range_test (Smith 2017)", "rule": "lr at the smoothed loss minimum / 10",
            "lr_at_min_loss": at_min, "chosen": chosen, "batches": len(lrs),
            "curve": [{"lr": a, "loss": b} for a, b in zip(lrs[::keep], smoothed[::keep])]}


def temperature_sweep(ctx: Any, data: StepData, config: jobspec.DistillStep, gen: torch.Generator) -> dict[str, Any]:
    """Short KD runs of a copy of the student per candidate temperature; returns the evidence with ``chosen``."""
    metric = headline_metric(ctx.task, ctx.y_val is not None)
    higher = metric in HIGHER_IS_BETTER
    rows = min(SWEEP_ROWS, data.table.n)
    results = []
    state = torch.get_rng_state()
    for t in TEMPERATURES:
        model = copy.deepcopy(ctx.student).train()
        loss_fn = losses.build(config.loss.model_copy(update={"temperature": t}))
        optimizer = optimizers.build(config.optimizer).create([p for p in model.parameters() if p.requires_grad])
        batches = _batches(data, config.batch_size, torch.Generator().manual_seed(int(gen.initial_seed())), rows)
        for _ in range(SWEEP_STEPS):
            _update(optimizer, _batch_loss(ctx, data, next(batches), model, loss_fn))
        student, ctx.student = ctx.student, model
        try:
            value = float(ctx.evaluate()[metric])
        finally:
            ctx.student = student
        results.append({"temperature": t, metric: value})
    torch.set_rng_state(state)
    best = results[0]
    for r in results[1:]:
        if (r[metric] > best[metric]) if higher else (r[metric] < best[metric]):
            best = r
    return {"method": "sweep", "metric": metric, "rows": rows, "batches_per_candidate": SWEEP_STEPS,
            "candidates": results, "chosen": best["temperature"]}


def resolve_auto(ctx: Any, step: Any, index: int,
                 config: jobspec.DistillStep) -> tuple[jobspec.DistillStep, dict[str, Any]]:
    """``config`` (the spec's step, ``"auto"`` values included) with those values chosen, and the evidence
    ``{field: {...}}``.

    ``step`` is the engine's distill step (built from :func:`provisional`); its data comes from
    ``ctx.step_data`` (memoized: the training after this reuses the same table and teacher cache)."""
    data = ctx.step_data(step, index, [])
    gen = torch.Generator().manual_seed(ctx.seed * 1009 + index)
    evidence: dict[str, Any] = {}
    update: dict[str, Any] = {}
    if config.epochs == "auto":
        update["epochs"] = jobspec.training.AUTO_EPOCHS
        evidence["epochs"] = {"max": jobspec.training.AUTO_EPOCHS,
                              "rule": "stop when the held-out metric stops improving (plateau schedule)"}
    temperature_auto = getattr(config.loss, "temperature", None) == "auto"
    loss_cfg = config.loss.model_copy(update={"temperature": PROVISIONAL_TEMPERATURE}) if temperature_auto \
        else config.loss
    if config.optimizer.lr == "auto":
        from engine.training.loop import label_loss

        loss_fn = label_loss(ctx.task) if ctx.baseline else losses.build(loss_cfg)
        evidence["lr"] = lr_range_test(ctx, data, config, loss_fn, gen)
        update["optimizer"] = config.optimizer.model_copy(update={"lr": evidence["lr"]["chosen"]})
        ctx.reporter.event("auto", f"step {index}: learning rate {evidence['lr']['chosen']:.3g} chosen by a range "
                           f"test ({evidence['lr']['batches']} batches; loss lowest at "
                           f"{evidence['lr']['lr_at_min_loss']:.3g})", data={"step": index, "lr": evidence["lr"]["chosen"]})
    if temperature_auto and not ctx.baseline:
        resolved = config.model_copy(update={**update, "loss": loss_cfg})
        evidence["temperature"] = temperature_sweep(ctx, data, resolved, gen)
        t = evidence["temperature"]["chosen"]
        ctx.reporter.event("auto", f"step {index}: temperature {t:g} chosen by a sweep over "
                           f"{', '.join(f'{c:g}' for c in TEMPERATURES)} "
                           f"({evidence['temperature']['metric']} on the held-out split)",
                           data={"step": index, "temperature": t, "candidates": evidence["temperature"]["candidates"]})
        update["loss"] = config.loss.model_copy(update={"temperature": t})
    elif temperature_auto:
        update["loss"] = loss_cfg  # the baseline twin trains on labels: no temperature to choose
    return config.model_copy(update=update), evidence
