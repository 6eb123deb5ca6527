"""Pipeline step kinds (registry ``steps``, selected by ``steps[i].kind``).

A step instance has ``epochs`` (for progress accounting), ``method`` (shown in
the report, e.g. the loss type) and ``run(ctx, index)``, which updates
``ctx.student`` in place (or replaces it, for future architecture-changing
steps such as pruning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .registry import check, losses, optimizers, steps
from .train import TrainContext, fit


@steps.register("distill")
class DistillStep:
    """Train the student to match the teacher's logits with a distillation loss."""

    @dataclass(frozen=True)
    class Config:
        loss: dict = field(default_factory=lambda: {"type": "kd"})
        epochs: int = 10
        batch_size: int = 128
        optimizer: dict = field(default_factory=lambda: {"type": "adamw"})

        def __post_init__(self) -> None:
            check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
            check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")

    def __init__(self, config: Config, loss: Any, optimizer: Any):
        self.config = config
        self.loss = loss
        self.optimizer = optimizer

    @classmethod
    def from_config(cls, config: Config, where: str) -> DistillStep:
        return cls(
            config,
            losses.build(config.loss, where=f"{where}.loss"),
            optimizers.build(config.optimizer, where=f"{where}.optimizer"),
        )

    @property
    def epochs(self) -> int:
        return self.config.epochs

    @property
    def method(self) -> str:
        return self.loss.name

    def run(self, ctx: TrainContext, index: int) -> None:
        fit(
            ctx,
            step_index=index,
            step_kind=self.name,  # type: ignore[attr-defined]
            loss_fn=self.loss,
            optimizer=self.optimizer.create(ctx.student.parameters()),
            epochs=self.config.epochs,
            batch_size=self.config.batch_size,
        )
