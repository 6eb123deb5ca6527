"""Pipeline step kinds (registry ``steps``, selected by ``steps[i].kind``).

A step instance has ``epochs`` (for progress accounting), ``method`` (shown in
the report, e.g. the loss type), its typed sub-configs and ``run(ctx, index)``,
which trains ``ctx.student`` in place (see :mod:`.train`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from engine.training.optim import ScheduleConfig
from engine.registry import check, losses, make_config, optimizers, steps


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


@dataclass(frozen=True)
class GateConfig:
    metric: Literal["accuracy", "agreement", "f1_macro", "r2", "cosine"] = "accuracy"
    max_drop: float = 0.01

    def __post_init__(self) -> None:
        check(0.0 <= self.max_drop <= 1.0, f"max_drop must be in [0, 1], got {self.max_drop}")


@dataclass(frozen=True)
class InputReductionConfig:
    method: Literal["pca", "select_k_best"] = "pca"
    components: int = 16

    def __post_init__(self) -> None:
        check(self.components >= 1, f"components must be >= 1, got {self.components}")


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
        input_reduction: dict | None = None
        gate: dict | None = None

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
        self.input_reduction = (None if config.input_reduction is None else
                                make_config(InputReductionConfig, config.input_reduction,
                                            where=f"{where}.input_reduction"))
        self.gate = None if config.gate is None else make_config(GateConfig, config.gate, where=f"{where}.gate")

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
        from engine.training.loop import fit

        if self.input_reduction is not None:
            from engine.compression.input_reduction import apply_input_reduction

            apply_input_reduction(ctx, self, index)
        fit(ctx, self, index, resumable=True)


def _bad_obj(where: str) -> Any:
    from engine.errors import EngineError

    raise EngineError("invalid_spec", f"{where}: expected an object")


# ---------------------------------------------------------------------------------------------
# compression steps (implementations in :mod:`.compress`)


@dataclass(frozen=True)
class _FinetuneFields:
    epochs: int = 3
    loss: dict = field(default_factory=lambda: {"type": "kd"})
    batch_size: int = 128
    optimizer: dict = field(default_factory=lambda: {"type": "adamw", "lr": 1e-3})
    schedule: dict = field(default_factory=lambda: {"type": "cosine"})

    def __post_init__(self) -> None:
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


class Finetune:
    """Looks like a distill step to :func:`.train.fit`: KD from the job's original teacher on the
    job's dataset (cached teacher outputs), no hints, augmentation, coreset or early stopping."""

    hints: list = []
    augment = None
    synthesize = None
    coreset = None
    early_stopping = None
    input_reduction = None
    dataset_id = None

    def __init__(self, raw: dict | None, where: str, name: str):
        cfg = make_config(_FinetuneFields, raw or {}, where=where)
        # fit() reads config.epochs / batch_size / grad_clip
        self.config = _FitConfig(cfg.epochs, cfg.batch_size)
        self.fields = cfg
        self.loss = losses.build(cfg.loss, where=f"{where}.loss")
        self.optimizer = optimizers.build(cfg.optimizer, where=f"{where}.optimizer")
        self.schedule = make_config(ScheduleConfig, cfg.schedule or {}, where=f"{where}.schedule")
        self.name = name

    def describe(self) -> dict:
        return {"epochs": self.fields.epochs, "loss": self.loss.name, "batch_size": self.fields.batch_size,
                "optimizer": dict(self.fields.optimizer)}


@dataclass(frozen=True)
class _FitConfig:
    epochs: int
    batch_size: int
    grad_clip: float | None = None


@steps.register("prune")
class PruneStep:
    """Prune the current model (the teacher itself when the job has no student), optionally fine-tuning
    it by KD from the original teacher after every round (``iterations``), pruned weights kept at zero."""

    @dataclass(frozen=True)
    class Config:
        method: Literal["magnitude", "random", "layer", "channel"] = "magnitude"
        amount: float = 0.5
        scope: Literal["global", "layer"] = "global"
        iterations: int = 1
        finetune: dict | None = None
        gate: dict | None = None

        def __post_init__(self) -> None:
            check(0.0 < self.amount < 1.0, f"amount must be in (0, 1), got {self.amount}")
            check(self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}")

    def __init__(self, config: Config, where: str):
        self.config = config
        self.where = where
        self.finetune = None if config.finetune is None else Finetune(config.finetune, f"{where}.finetune", "prune")
        self.gate = None if config.gate is None else make_config(GateConfig, config.gate, where=f"{where}.gate")
        self.synthesize = self.coreset = self.augment = None
        self.dataset_id = None

    @classmethod
    def from_config(cls, config: Config, where: str) -> PruneStep:
        return cls(config, where)

    @property
    def epochs(self) -> int:
        return self.finetune.config.epochs * self.config.iterations if self.finetune else 0

    @property
    def method(self) -> str:
        return self.config.method

    def pruner_config(self) -> dict:
        c = self.config
        out: dict = {"method": c.method, "amount": c.amount, "iterations": c.iterations}
        if c.method == "magnitude":
            out["scope"] = c.scope
        return out

    def run(self, ctx: Any, index: int) -> None:
        from engine.steps.prune import run_prune

        run_prune(ctx, self, index)


@steps.register("quantize")
class QuantizeStep:
    """Lower the precision of the current model: torch int8 (dynamic / static FX / QAT), ONNX Runtime
    int8, or fp16/bf16 weights. Nothing can train the result further."""

    @dataclass(frozen=True)
    class Config:
        method: Literal["dynamic_int8", "static_int8", "onnx_int8", "fp16", "bf16", "qat"] = "dynamic_int8"
        mode: Literal["dynamic", "static"] = "dynamic"
        calibration_rows: int = 512
        finetune: dict | None = None
        gate: dict | None = None

        def __post_init__(self) -> None:
            check(self.calibration_rows >= 1, f"calibration_rows must be >= 1, got {self.calibration_rows}")

    def __init__(self, config: Config, where: str):
        self.config = config
        self.where = where
        ft = config.finetune
        if config.method == "qat" and ft is None:
            ft = {}
        self.finetune = None if ft is None else Finetune(ft, f"{where}.finetune", "quantize")
        self.gate = None if config.gate is None else make_config(GateConfig, config.gate, where=f"{where}.gate")
        self.synthesize = self.coreset = self.augment = None
        self.dataset_id = None

    @classmethod
    def from_config(cls, config: Config, where: str) -> QuantizeStep:
        return cls(config, where)

    @property
    def epochs(self) -> int:
        return self.finetune.config.epochs if (self.finetune and self.config.method == "qat") else 0

    @property
    def method(self) -> str:
        return self.config.method

    def run(self, ctx: Any, index: int) -> None:
        from engine.steps.quantize import run_quantize

        run_quantize(ctx, self, index)
