"""The training loop shared by step kinds, and the state steps work on.

All training data lives in memory on the engine device; batches are taken by
indexing with a per-epoch permutation from a seeded ``torch.Generator``
(cheaper and more deterministic than a DataLoader for in-memory tensors).
Teacher logits are computed once by the pipeline and reused every epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .evaluate import classification_metrics, predict
from .types import Cancelled, EngineError, Reporter

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class ProgressTracker:
    """Turns finished epochs into ``reporter.progress`` dicts.

    ``fraction`` counts epochs across all steps, so it reaches exactly 1.0 after
    the last epoch of the last step; ``eta_seconds`` is mean epoch time times
    the epochs left.
    """

    def __init__(self, reporter: Reporter, total_epochs: int):
        self.reporter = reporter
        self.total_epochs = max(1, total_epochs)
        self.done_epochs = 0
        self.epoch_seconds: list[float] = []

    def epoch_done(self, *, step_index: int, step_kind: str, epoch: int, epochs: int, seconds: float) -> None:
        self.done_epochs += 1
        self.epoch_seconds.append(seconds)
        remaining = self.total_epochs - self.done_epochs
        mean = sum(self.epoch_seconds) / len(self.epoch_seconds)
        self.reporter.progress(
            {
                "step_index": step_index,
                "step_kind": step_kind,
                "epoch": epoch,
                "epochs": epochs,
                "fraction": 1.0 if remaining <= 0 else self.done_epochs / self.total_epochs,
                "eta_seconds": float(mean * remaining) if remaining > 0 else 0.0,
            }
        )


@dataclass
class TrainContext:
    """Everything a step needs. Steps may replace ``student``/``architecture``.

    Shapes: ``x_*`` float32 [N, *row_shape]; ``t_*`` teacher logits float32
    [N, C]; ``y_*`` int64 [N] or None. All on ``device``.
    """

    student: nn.Module
    architecture: dict[str, Any]
    device: torch.device
    x_train: torch.Tensor
    t_train: torch.Tensor
    y_train: torch.Tensor | None
    x_val: torch.Tensor
    t_val: torch.Tensor
    y_val: torch.Tensor | None
    reporter: Reporter
    generator: torch.Generator
    progress: ProgressTracker
    history: list[dict[str, Any]] = field(default_factory=list)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the current student: agreement, accuracy?, f1_macro?."""
        return classification_metrics(predict(self.student, self.x_val), self.t_val, self.y_val)

    def check_stop(self, where: str) -> None:
        if self.reporter.should_stop():
            raise Cancelled(f"job cancelled by request {where}")


def fit(
    ctx: TrainContext,
    *,
    step_index: int,
    step_kind: str,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
) -> None:
    """Train ``ctx.student`` for ``epochs`` epochs against the cached teacher logits.

    After each epoch: held-out evaluation, metrics ``train_loss``,
    ``val_accuracy`` (labelled data only) and ``val_agreement``, and a progress
    report. ``reporter.should_stop()`` is polled before every batch.
    """
    model = ctx.student
    n = ctx.x_train.shape[0]
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        # The permutation is drawn on CPU from the job's generator so the batch
        # order is identical on every device for a given seed.
        order = torch.randperm(n, generator=ctx.generator).to(ctx.device)
        # Accumulate on-device to avoid a host sync per batch.
        loss_sum = torch.zeros((), device=ctx.device)
        for start in range(0, n, batch_size):
            ctx.check_stop(f"during step {step_index}, epoch {epoch}")
            idx = order[start : start + batch_size]
            labels = ctx.y_train[idx] if ctx.y_train is not None else None
            loss = loss_fn(model(ctx.x_train[idx]), ctx.t_train[idx], labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * idx.shape[0]
        train_loss = float(loss_sum) / n
        if not torch.isfinite(torch.tensor(train_loss)):
            raise EngineError(
                "invalid_spec",
                f"training diverged in step {step_index}, epoch {epoch} (loss is {train_loss}); "
                "try a lower learning rate",
            )
        metrics = ctx.evaluate()
        rep = ctx.reporter
        rep.metric(step=step_index, epoch=epoch, name="train_loss", value=train_loss)
        if "accuracy" in metrics:
            rep.metric(step=step_index, epoch=epoch, name="val_accuracy", value=metrics["accuracy"])
        rep.metric(step=step_index, epoch=epoch, name="val_agreement", value=metrics["agreement"])
        ctx.history.append({"step": step_index, "epoch": epoch, "train_loss": train_loss, **metrics})
        ctx.progress.epoch_done(
            step_index=step_index,
            step_kind=step_kind,
            epoch=epoch,
            epochs=epochs,
            seconds=time.perf_counter() - started,
        )
