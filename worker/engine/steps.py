"""Pipeline step kinds (registry ``steps``, selected by ``steps[i].kind``).

A step instance has ``epochs`` (for progress accounting), ``method`` (shown in
the report, e.g. the loss type), its typed sub-configs and ``run(ctx, index)``,
which trains ``ctx.student`` in place (see :mod:`.train`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .optim import ScheduleConfig
from .registry import check, losses, make_config, optimizers, steps


@dataclass(frozen=True)
class HintConfig:
    teacher: str
    student: str = "penultimate"
    weight: float = 1.0
    distance: Literal["mse", "cosine", "attention"] = "mse"

    def __post_init__(self) -> None:
        check(bool(self.teacher), "teacher must name a module")
        check(self.weight >= 0, f"weight must be >= 0, got {self.weight}")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    patience: int = 5
    metric: Literal["auto", "accuracy", "agreement", "mse", "cosine", "loss"] = "auto"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        check(self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        check(self.min_delta >= 0, f"min_delta must be >= 0, got {self.min_delta}")


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = False
    shift: int = 0
    noise: float = 0.0
    mixup: float = 0.0

    def __post_init__(self) -> None:
        check(self.shift >= 0, f"shift must be >= 0, got {self.shift}")
        check(self.noise >= 0, f"noise must be >= 0, got {self.noise}")
        check(self.mixup >= 0, f"mixup must be >= 0, got {self.mixup}")

    @property
    def active(self) -> bool:
        return bool(self.flip or self.shift or self.noise or self.mixup)


@dataclass(frozen=True)
class SynthesizeConfig:
    method: Literal["generator"] = "generator"
    num_samples: int = 10_000
    generator_epochs: int = 30
    latent_dim: int = 64

    def __post_init__(self) -> None:
        check(self.num_samples >= 2, f"num_samples must be >= 2, got {self.num_samples}")
        check(self.generator_epochs >= 1, f"generator_epochs must be >= 1, got {self.generator_epochs}")
        check(self.latent_dim >= 1, f"latent_dim must be >= 1, got {self.latent_dim}")


@dataclass(frozen=True)
class CoresetConfig:
    method: Literal["kmeans", "random"] = "kmeans"
    fraction: float = 0.25

    def __post_init__(self) -> None:
        check(0.0 < self.fraction <= 1.0, f"fraction must be in (0, 1], got {self.fraction}")


@steps.register("distill")
class DistillStep:
    """Train the student to imitate the teacher (loss + optional hints), optionally data-free or on a coreset."""

    @dataclass(frozen=True)
    class Config:
        loss: dict = field(default_factory=lambda: {"type": "kd"})
        hints: list[dict] = field(default_factory=list)
        epochs: int = 20
        batch_size: int = 128
        optimizer: dict = field(default_factory=lambda: {"type": "adamw"})
        schedule: dict = field(default_factory=lambda: {"type": "cosine"})
        grad_clip: float | None = None
        early_stopping: dict | None = None
        augment: dict | None = None
        dataset_id: str | None = None
        synthesize: dict | None = None
        coreset: dict | None = None

        def __post_init__(self) -> None:
            check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
            check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
            check(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")
            check(not (self.synthesize and self.coreset), "coreset cannot be combined with synthesize")

    def __init__(self, config: Config, loss: Any, optimizer: Any, where: str):
        self.config = config
        self.loss = loss
        self.optimizer = optimizer
        self.where = where
        self.hints = [make_config(HintConfig, h, where=f"{where}.hints[{i}]") if isinstance(h, dict) else _bad_obj(
            f"{where}.hints[{i}]") for i, h in enumerate(config.hints)]
        self.schedule = make_config(ScheduleConfig, config.schedule or {}, where=f"{where}.schedule")
        self.early_stopping = (None if config.early_stopping is None else
                               make_config(EarlyStoppingConfig, config.early_stopping, where=f"{where}.early_stopping"))
        self.augment = (None if config.augment is None else
                        make_config(AugmentConfig, config.augment, where=f"{where}.augment"))
        self.synthesize = (None if config.synthesize is None else
                           make_config(SynthesizeConfig, config.synthesize, where=f"{where}.synthesize"))
        self.coreset = (None if config.coreset is None else
                        make_config(CoresetConfig, config.coreset, where=f"{where}.coreset"))

    @classmethod
    def from_config(cls, config: Config, where: str) -> DistillStep:
        return cls(
            config,
            losses.build(config.loss, where=f"{where}.loss"),
            optimizers.build(config.optimizer, where=f"{where}.optimizer"),
            where,
        )

    @property
    def epochs(self) -> int:
        return self.config.epochs

    @property
    def method(self) -> str:
        return self.loss.name

    @property
    def dataset_id(self) -> str | None:
        return self.config.dataset_id

    def run(self, ctx: Any, index: int) -> None:
        from .train import fit

        fit(ctx, self, index)


def _bad_obj(where: str) -> Any:
    from .types import EngineError

    raise EngineError("invalid_spec", f"{where}: expected an object")
