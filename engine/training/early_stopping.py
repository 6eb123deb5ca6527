"""Early stopping of a step's training (``step.early_stopping``): which metric it watches, and the best
epoch so far.

:class:`EarlyStopping` is fed one held-out value per epoch and says when ``patience`` epochs went by
without an improvement of more than ``min_delta``; it keeps the best epoch's weights so that
:func:`~engine.training.loop.fit` can restore them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from engine.metrics import HIGHER_IS_BETTER, headline_metric


def resolve_stop_metric(metric: str, task: str, has_labels: bool) -> str:
    """The metric name early stopping watches: ``auto`` is the task's headline metric; ``mse`` on a
    regression job without labels is the agreement with the teacher (``agreement_mse``)."""
    if metric == "auto":
        return headline_metric(task, has_labels)
    if metric == "mse" and task == "regression" and not has_labels:
        return "agreement_mse"
    return metric


def metric_value(name: str, metrics: Mapping[str, float], val_loss: float) -> float:
    """The watched value of one epoch: the held-out loss for ``loss``, else ``metrics[name]``."""
    return val_loss if name == "loss" else metrics[name]


class EarlyStopping:
    """The state of early stopping in one step.

    ``config``: the step's ``early_stopping`` (``metric``, ``patience``, ``min_delta``) or None (never
    stops; ``metric`` is then None). ``best``: ``(value, epoch, state_dict copy)`` of the best epoch so
    far, or None; ``bad_epochs``: epochs since it. Both are saved in and restored from checkpoints.
    """

    def __init__(self, config: Any, task: str, has_labels: bool):
        self.config = config
        self.metric = resolve_stop_metric(config.metric, task, has_labels) if config else None
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.bad_epochs = 0

    @property
    def active(self) -> bool:
        return self.config is not None and self.metric is not None

    def update(self, value: float, epoch: int, model: nn.Module) -> bool:
        """Record epoch ``epoch``'s watched ``value`` (copying ``model``'s weights when it is the best so
        far); True when patience ran out and training should stop."""
        higher = self.metric in HIGHER_IS_BETTER
        best = self.best
        min_delta = self.config.min_delta
        improved = best is None or (value > best[0] + min_delta if higher else value < best[0] - min_delta)
        if improved:
            self.best = (value, epoch, copy.deepcopy(model.state_dict()))
            self.bad_epochs = 0
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.config.patience
