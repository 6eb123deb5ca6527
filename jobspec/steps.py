"""Step configs (``steps[i].kind``): distill, prune, quantize; their gates and fine-tuning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from jobspec.base import Config, auto_or_within, union
from jobspec.data import Coreset, InputReduction, Synthesize
from jobspec.losses import Hint, KDLoss, Loss
from jobspec.training import AUTO_EPOCHS, Augment, EarlyStopping, OptimizerConfig, ScheduleConfig

GATE_METRICS = ("accuracy", "agreement", "f1_macro", "r2", "cosine", "perplexity")
PRUNE_METHODS = ("magnitude", "random", "layer", "channel")
QUANTIZE_METHODS = ("dynamic_int8", "static_int8", "onnx_int8", "fp16", "bf16", "qat")


class Gate(Config):
    """Quality gate: the step's output may lose at most ``max_drop`` of ``metric`` against the teacher.

    ``perplexity`` (causal_lm): ``max_drop`` is the relative increase allowed over the teacher's held-out
    perplexity (0.3: at most 1.3× the teacher's); ``agreement`` on a causal_lm is top-1 token agreement (the
    teacher's is 1)."""

    metric: Literal["accuracy", "agreement", "f1_macro", "r2", "cosine", "perplexity"] = "accuracy"
    max_drop: float = Field(0.01, ge=0, le=100, description="Absolute drop allowed, e.g. 0.01 = one point "
                                                            "(perplexity: relative increase).")
    against: Literal["teacher", "labels"] = Field(
        "teacher", description="'teacher': the drop below the teacher's own score on the held-out split (overstated "
                               "when the teacher saw that data); 'labels': the student's score against the labels "
                               "must reach 'min', whatever the teacher scores. 'agreement' is always against the "
                               "teacher's predictions.")
    min: float | None = Field(None, ge=-1e6, le=1e6, description="against 'labels': the lowest score that passes.")

    @model_validator(mode="after")
    def _reference(self) -> Gate:
        if self.against == "labels":
            if self.metric not in ("accuracy", "f1_macro", "r2"):
                raise ValueError(f"against 'labels' is for accuracy, f1_macro or r2; {self.metric!r} is measured "
                                 "against the teacher")
            if self.min is None:
                raise ValueError("against 'labels' needs 'min', the lowest score that passes (e.g. 0.9)")
        elif self.min is not None:
            raise ValueError("'min' is for against 'labels'; against the teacher the gate uses max_drop")
        return self


class DistillStep(Config):
    """Train the student to imitate the teacher."""

    kind: Literal["distill"] = "distill"
    loss: Loss = Field(default_factory=KDLoss)
    hints: list[Hint] = Field(default_factory=list, max_length=16)
    epochs: int | Literal["auto"] = Field(20, description="Epochs (an upper bound under the default 'plateau' "
                                                         f"schedule), or 'auto': up to {AUTO_EPOCHS}, stopping when "
                                                         "the held-out metric stops improving.")
    batch_size: int = Field(128, ge=1, le=65_536)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient's global norm to this.")
    early_stopping: EarlyStopping | None = None
    augment: Augment | None = None
    dataset_id: str | None = Field(None, max_length=40,
                                   description="Transfer data for this step (default: the job's dataset).")
    synthesize: Synthesize | None = None
    coreset: Coreset | None = None
    input_reduction: InputReduction | None = None
    gate: Gate | None = None
    # Generative language models (task causal_lm) only.
    max_seq_len: int = Field(256, ge=8, le=131_072, description="causal_lm: tokens per training sequence "
                                                                "(documents are packed into blocks this long).")
    grad_accumulation: int = Field(1, ge=1, le=1024, description="causal_lm: batches per optimizer step.")
    gradient_checkpointing: bool = Field(False, description="causal_lm: recompute activations in the backward "
                                                            "pass (less memory, ~30% more compute).")
    on_policy: float = Field(0.0, ge=0, le=1, description="causal_lm: the share λ of batches whose continuations the "
                                                          "student samples itself, scored by the teacher (GKD).")

    _epochs = field_validator("epochs")(lambda v: auto_or_within(v, 1, 10_000, "epochs", low_inclusive=True))

    @property
    def max_epochs(self) -> int:
        """The epochs this step may train: ``epochs``, or :data:`AUTO_EPOCHS` for ``auto``."""
        return AUTO_EPOCHS if self.epochs == "auto" else int(self.epochs)

    @model_validator(mode="after")
    def _data_source(self) -> DistillStep:
        if self.epochs == "auto" and self.schedule.type != "plateau" and self.early_stopping is None:
            raise ValueError(f"epochs 'auto' stops when the held-out metric stops improving: use the 'plateau' "
                             f"schedule (the default) or early_stopping with schedule {self.schedule.type!r}, or "
                             "name the number of epochs")
        if self.synthesize is not None and self.coreset is not None:
            raise ValueError("coreset selects from real data; it cannot be combined with synthesize")
        if self.synthesize is not None and self.input_reduction is not None:
            raise ValueError("input_reduction cannot be combined with synthesize")
        return self

    @property
    def method(self) -> str:
        return self.loss.type


class Finetune(Config):
    """Recover quality after compression by distilling from the job's original teacher."""

    epochs: int = Field(3, ge=1, le=10_000)
    loss: Loss = Field(default_factory=KDLoss)
    batch_size: int = Field(128, ge=1, le=65_536)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=1e-3))
    # A fine-tune is a short, fixed recovery run: it decays on a clock (it has no early stopping of its own).
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(type="cosine"))
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient's global norm to this.")

    @model_validator(mode="after")
    def _no_auto(self) -> Finetune:
        if self.optimizer.lr == "auto" or getattr(self.loss, "temperature", None) == "auto":
            raise ValueError("'auto' (lr, temperature) is for distill steps; a fine-tune needs numbers")
        return self


class PruneStep(Config):
    """Remove weights (unstructured) or whole neurons/channels (structured), then optionally fine-tune."""

    kind: Literal["prune"] = "prune"
    method: Literal["magnitude", "random", "layer", "channel"] = "magnitude"
    amount: float = Field(0.5, gt=0, lt=1, description="Share of weights (or channels) removed.")
    scope: Literal["global", "layer"] = Field("global", description="magnitude: one threshold, or per layer.")
    iterations: int = Field(1, ge=1, le=100, description="Prune gradually in k rounds (fine-tuning between).")
    finetune: Finetune | None = None
    gate: Gate | None = None


class QuantizeStep(Config):
    """Lower the precision of weights (and activations, for static/QAT)."""

    kind: Literal["quantize"] = "quantize"
    method: Literal["dynamic_int8", "static_int8", "onnx_int8", "fp16", "bf16", "qat"] = "dynamic_int8"
    mode: Literal["dynamic", "static"] = Field("dynamic", description="onnx_int8: dynamic or static QDQ.")
    calibration_rows: int = Field(512, ge=16, le=1_000_000, description="static_int8 / onnx_int8 static.")
    finetune: Finetune | None = Field(None, description="qat: the KD training run with fake quantization "
                                                        "(default: the Finetune defaults).")
    gate: Gate | None = None


class GenerateStep(Config):
    """causal_lm: the teacher writes completions for a dataset of prompts; the following distill steps that name
    no dataset of their own train on them (sequence-level KD, Kim & Rush 2016). The result is also an artifact."""

    kind: Literal["generate"] = "generate"
    dataset_id: str | None = Field(None, max_length=40, description="The prompts (default: the job's dataset): "
                                                                    "{\"prompt\"} or {\"prompt\", \"completion\"} records.")
    max_new_tokens: int = Field(128, ge=1, le=8192)
    temperature: float = Field(1.0, ge=0, le=10, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest token set holding this mass.")
    num_return_sequences: int = Field(1, ge=1, le=16, description="Completions per prompt.")
    gate: None = None  # nothing to compare: the step makes data, not a model

    @property
    def epochs(self) -> int:
        return 0


STEP_KINDS: dict[str, type[Config]] = {"distill": DistillStep, "prune": PruneStep, "quantize": QuantizeStep,
                                       "generate": GenerateStep}
Step = union(STEP_KINDS, "kind")
