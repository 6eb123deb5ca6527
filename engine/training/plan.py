"""What :func:`engine.training.loop.fit` and the data plan read from a step they train: a typed protocol,
implemented by the distill step and by the fine-tuning of prune/quantize steps (``engine.steps.kinds``).

``config`` is the spec's model (``epochs``, ``batch_size``, ``grad_clip``); ``loss`` is called as
``loss(student_out [B, D], teacher_out [B, D], labels [B] | None) -> scalar``; ``optimizer.create(params)``
builds the torch optimizer. The transfer-data options are ``None`` where a step does not have them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

import jobspec


class TrainingConfig(Protocol):
    epochs: int
    batch_size: int
    grad_clip: float | None


class OptimizerFactory(Protocol):
    def create(self, params: Any) -> torch.optim.Optimizer: ...


class TrainingPlan(Protocol):
    name: str
    config: TrainingConfig
    loss: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
    optimizer: OptimizerFactory
    schedule: jobspec.ScheduleConfig
    hints: tuple[jobspec.Hint, ...]
    augment: jobspec.Augment | None
    early_stopping: jobspec.EarlyStopping | None
    synthesize: jobspec.Synthesize | None
    coreset: jobspec.Coreset | None
    dataset_id: str | None
