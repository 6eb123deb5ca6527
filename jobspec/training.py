"""How a step trains: optimizer, learning-rate schedule, early stopping, augmentation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from jobspec.base import Config

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "one_cycle")


class OptimizerConfig(Config):
    type: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum; β1 for Adam/AdamW.")


class ScheduleConfig(Config):
    """Learning-rate schedule over the step's epochs, with linear warm-up."""

    type: Literal["constant", "cosine", "one_cycle"] = "cosine"
    warmup_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the steps spent warming up.")


class EarlyStopping(Config):
    """Stop when the held-out metric has not improved for ``patience`` epochs; restore the best weights."""

    patience: int = Field(5, ge=1, le=10_000)
    metric: Literal["auto", "accuracy", "agreement", "mse", "cosine", "loss"] = "auto"
    min_delta: float = Field(0.0, ge=0)


class Augment(Config):
    """Augmentations; the teacher sees the same augmented batch as the student (consistent teaching)."""

    flip: bool = Field(False, description="Random horizontal flip (N×C×H×W inputs).")
    shift: int = Field(0, ge=0, le=64, description="Random translation by up to this many pixels.")
    noise: float = Field(0.0, ge=0, le=10, description="Gaussian noise std added to float inputs.")
    mixup: float = Field(0.0, ge=0, le=10, description="Mixup Beta(α, α) on inputs; 0 disables.")

    @property
    def active(self) -> bool:
        return bool(self.flip or self.shift or self.noise or self.mixup)
