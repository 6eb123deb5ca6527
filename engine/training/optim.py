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
    if config.type == "constant":
        return 1.0
    progress = (step - n_warm) / max(1, total - n_warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Scheduler:
    """Sets every param group's lr to ``base_lr * lr_factor(step)``; call :meth:`step` after each batch."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int):
        self.optimizer, self.config, self.total = optimizer, config, max(1, total_steps)
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.count = 0
        self._apply()

    def _apply(self) -> None:
        f = lr_factor(self.config, min(self.count, self.total - 1), self.total)
        for g, base in zip(self.optimizer.param_groups, self.base):
            g["lr"] = base * f

    def step(self) -> None:
        self.count += 1
        self._apply()

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at batch ``count`` (the schedule is a pure function of it; ``base`` comes from the config)."""
        self.count = int(state["count"])
        self._apply()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
