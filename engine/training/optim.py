"""Optimizers (registry ``optimizers``, selected by ``optimizer.type``).

``factory.create(params) -> torch.optim.Optimizer``.

All optimizers share one config shape because the API fills every field for
every type. ``momentum`` is SGD's momentum; for Adam/AdamW it is used as
``beta1`` (Adam's first-moment decay, i.e. its momentum; default 0.9 matches
torch's own default).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math
from collections.abc import Iterable

import torch

from engine.registry import optimizers
from jobspec import OptimizerConfig, ScheduleConfig


class _Optimizer(ABC):
    Config = OptimizerConfig

    def __init__(self, config: OptimizerConfig):
        self.config = config

    @abstractmethod
    def create(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """A torch optimizer over ``params`` with this config's lr, weight decay and momentum."""


@optimizers.register("adam")
class Adam(_Optimizer):
    def create(self, params):
        c = self.config
        return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay, betas=(c.momentum, 0.999))


@optimizers.register("adamw")
class AdamW(_Optimizer):
    def create(self, params):
        c = self.config
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay, betas=(c.momentum, 0.999))


@optimizers.register("sgd")
class SGD(_Optimizer):
    def create(self, params):
        c = self.config
        return torch.optim.SGD(params, lr=c.lr, weight_decay=c.weight_decay, momentum=c.momentum)


# ---- learning-rate schedules (stepped once per batch) -----------------------------------------

#: one_cycle warms up over this share of the steps when warmup_fraction is 0.
ONE_CYCLE_DEFAULT_WARMUP = 0.3


def lr_factor(config: ScheduleConfig, step: int, total: int) -> float:
    """Multiplier of the base lr for batch ``step`` (0-based) of ``total``.

    Linear warm-up from ~0 over ``warmup_fraction`` of the steps, then: ``constant`` 1;
    ``cosine`` half-cosine from 1 to 0; ``one_cycle`` warm-up from 1/25 (0.3 of the steps
    by default) then cosine down to 1e-4.
    """
    total = max(1, total)
    warm = config.warmup_fraction
    if config.type == "one_cycle":
        warm = warm or ONE_CYCLE_DEFAULT_WARMUP
        n_warm = max(1, int(round(warm * total)))
        if step < n_warm:
            start = 1.0 / 25.0
            return start + (1.0 - start) * (step + 1) / n_warm
        progress = (step - n_warm) / max(1, total - n_warm)
        return 1e-4 + (1.0 - 1e-4) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    n_warm = int(round(warm * total))
    if step < n_warm:
        return (step + 1) / (n_warm + 1)
    if config.type in ("constant", "plateau"):  # plateau: cut by Scheduler.epoch_end, not by the clock
        return 1.0
    progress = (step - n_warm) / max(1, total - n_warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Scheduler:
    """Sets every param group's lr to ``base_lr * lr_factor(step) * scale``; call :meth:`step` after each batch
    and, for a ``plateau`` schedule, :meth:`epoch_end` after each held-out evaluation.

    ``plateau`` is ``ReduceLROnPlateau`` (the Keras / torch rule) fed by the loop's own judgement of improvement
    (the early-stopping metric, ties broken by the held-out loss): ``scale`` is multiplied by ``factor`` after
    ``patience`` epochs without improvement. A clock schedule decays whether or not the student still learns;
    an under-fitting student then stops learning early (cosine to 0 lost 7 points on digits against a constant lr).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int,
                 epochs: int = 1):
        self.optimizer, self.config, self.total = optimizer, config, max(1, total_steps)
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.count = 0
        self.scale = 1.0
        self.bad_epochs = 0
        self.patience = config.plateau_patience(epochs)
        self._apply()

    @property
    def plateau(self) -> bool:
        return self.config.type == "plateau"

    def _apply(self) -> None:
        f = lr_factor(self.config, min(self.count, self.total - 1), self.total) * self.scale
        for g, base in zip(self.optimizer.param_groups, self.base):
            g["lr"] = base * f

    def step(self) -> None:
        self.count += 1
        self._apply()

    def epoch_end(self, improved: bool) -> bool:
        """Count an epoch (``plateau`` only); True when this epoch's plateau cut the lr."""
        if not self.plateau:
            return False
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        if self.bad_epochs < self.patience:
            return False
        self.bad_epochs = 0
        self.scale *= self.config.factor
        self._apply()
        return True

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "total": self.total, "scale": self.scale, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue at batch ``count`` (the clock part is a pure function of it; ``base`` comes from the config)
        with the plateau cuts made so far (absent in checkpoints written before plateau existed)."""
        self.count = int(state["count"])
        self.scale = float(state.get("scale", 1.0))
        self.bad_epochs = int(state.get("bad_epochs", 0))
        self._apply()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
