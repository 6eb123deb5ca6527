"""Early stopping of a step's training (``step.early_stopping``): which metric it watches, and the best
epoch so far.

:class:`EarlyStopping` is fed one held-out value per epoch and says when ``patience`` epochs went by
without an improvement of more than ``min_delta``; it keeps the best epoch's weights so that
:func:`~engine.training.loop.fit` can restore them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import jobspec
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


#: The relative improvement of the held-out loss that counts under the implicit (plateau) stopping rule.
IMPLICIT_REL_DELTA = 1e-3


class EarlyStopping:
    """The state of early stopping in one step.

    ``config``: the step's ``early_stopping`` (``metric``, ``patience``, ``min_delta``) or None. Under a
    ``plateau`` schedule without ``early_stopping`` the step still stops and restores its best epoch: after
    ``2·patience + 1`` epochs without improvement, i.e. when two lr cuts in a row brought nothing (``implicit``).
    Otherwise None never stops (``metric`` is then None). ``best``: ``(value, epoch, state_dict copy)`` of the best
    epoch so far, or None; ``bad_epochs``: epochs since it. Both are saved in and restored from checkpoints.
    ``improved``: whether the last :meth:`update` was a new best.
    """

    def __init__(self, config: Any, task: str, has_labels: bool, *, schedule: Any = None, epochs: int = 1):
        self.implicit = config is None and schedule is not None and schedule.type == "plateau"
        if self.implicit:
            # The held-out loss (the step's own objective), not the headline metric: accuracy on a held-out
            # split of a few hundred rows moves in steps of a fraction of a point, and a plateau judged on that
            # noise cut the lr and stopped an under-fitting student early (digits: 26 of 40 epochs, −9 points).
            config = jobspec.EarlyStopping(patience=2 * schedule.plateau_patience(epochs) + 1, metric="loss")
        #: improvements smaller than this share of the best value do not count (torch's ReduceLROnPlateau
        #: ``threshold`` in ``rel`` mode): a loss creeping down by 0.01 % an epoch is a plateau, not progress.
        self.rel_delta = IMPLICIT_REL_DELTA if self.implicit else 0.0
        self.config = config
        self.metric = resolve_stop_metric(config.metric, task, has_labels) if config else None
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.best_loss = math.inf
        self.bad_epochs = 0
        self.improved = False

    @property
    def active(self) -> bool:
        return self.config is not None and self.metric is not None

    def update(self, value: float, epoch: int, model: nn.Module, loss: float = math.nan) -> bool:
        """Record epoch ``epoch``'s watched ``value`` (copying ``model``'s weights when it is the best so
        far); True when patience ran out and training should stop.

        ``loss``, the held-out loss, breaks ties: accuracy on a few hundred rows moves in steps, and an epoch
        that keeps it while fitting the teacher better is progress (it must not count towards a plateau)."""
        higher = self.metric in HIGHER_IS_BETTER
        best = self.best
        min_delta = self.config.min_delta
        margin = max(min_delta, self.rel_delta * abs(best[0])) if best is not None else 0.0
        improved = best is None or (value > best[0] + margin if higher else value < best[0] - margin)
        if not improved and best is not None and value == best[0] and loss < self.best_loss:
            improved = True
        self.improved = improved
        if improved:
            self.best = (value, epoch, copy.deepcopy(model.state_dict()))
            self.best_loss = loss if math.isfinite(loss) else math.inf
            self.bad_epochs = 0
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.config.patience
