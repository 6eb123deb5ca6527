"""Step configs (``steps[i].kind``): distill, prune, quantize; their gates and fine-tuning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jobspec.base import Config, union
from jobspec.data import Coreset, InputReduction, Synthesize
from jobspec.losses import Hint, KDLoss, Loss
from jobspec.training import Augment, EarlyStopping, OptimizerConfig, ScheduleConfig

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


class DistillStep(Config):
    """Train the student to imitate the teacher."""

    kind: Literal["distill"] = "distill"
    loss: Loss = Field(default_factory=KDLoss)
    hints: list[Hint] = Field(default_factory=list, max_length=16)
    epochs: int = Field(20, ge=1, le=10_000)
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

    @model_validator(mode="after")
    def _data_source(self) -> DistillStep:
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
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient's global norm to this.")


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
