"""Optimizers (registry ``optimizers``, selected by ``optimizer.type``).

``factory.create(params) -> torch.optim.Optimizer``.

All optimizers share one config shape because the API fills every field for
every type. ``momentum`` is SGD's momentum; for Adam/AdamW it is used as
``beta1`` (Adam's first-moment decay, i.e. its momentum; default 0.9 matches
torch's own default).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .registry import check, optimizers


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}")


class _Optimizer:
    Config = OptimizerConfig

    def __init__(self, config: OptimizerConfig):
        self.config = config

    def create(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError


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
