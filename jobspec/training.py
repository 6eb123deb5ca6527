"""How a step trains: optimizer, learning-rate schedule, early stopping, augmentation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from jobspec.base import Config, auto_or_within

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("plateau", "constant", "cosine", "one_cycle")
#: ``"epochs": "auto"`` trains for at most this many epochs and stops when the held-out metric plateaus.
AUTO_EPOCHS = 100
#: Batches of the learning-rate range test (``"lr": "auto"``) and of the temperature sweep (4 candidates × 150).
AUTO_LR_BATCHES = 100
AUTO_TEMPERATURE_BATCHES = 600
#: Written where a value is chosen by the engine (``epochs``, ``optimizer.lr``, ``loss.temperature``).
AUTO = "auto"


class OptimizerConfig(Config):
    type: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float | Literal["auto"] = Field(3e-3, description="Learning rate, or 'auto': a learning-rate range test "
                                                           "on the transfer set picks it (Smith 2017).")
    weight_decay: float = Field(0.0, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum; β1 for Adam/AdamW.")

    _lr = field_validator("lr")(lambda v: auto_or_within(v, 0, 10, "lr"))


class ScheduleConfig(Config):
    """Learning-rate schedule over the step's epochs, with linear warm-up.

    ``plateau`` (the default) converges instead of following a clock: the lr stays constant until the held-out
    metric has not improved for ``patience`` epochs, is then multiplied by ``factor``; training stops when it has
    not improved for ``2·patience + 1`` epochs (or as ``early_stopping`` says) and the best epoch's weights are
    restored. ``epochs`` is then an upper bound. ``constant``, ``cosine`` (to 0 at the last epoch) and
    ``one_cycle`` follow the clock exactly, for all ``epochs``.
    """

    type: Literal["plateau", "constant", "cosine", "one_cycle"] = "plateau"
    warmup_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the steps spent warming up.")
    patience: int | None = Field(None, ge=1, le=1000, description="plateau: epochs without improvement before the "
                                                                  "lr is cut (default: epochs/10, within 2..10).")
    factor: float = Field(0.5, gt=0, lt=1, description="plateau: the lr is multiplied by this on a plateau.")

    def plateau_patience(self, epochs: int) -> int:
        """Epochs without improvement before a ``plateau`` schedule cuts the lr (for an ``epochs``-epoch step)."""
        return self.patience or min(10, max(2, epochs // 10))


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
