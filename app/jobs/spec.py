"""The job spec: typed, validated component configs (no torch).

Each component kind (step kinds, losses, student families, optimizers, schedules) is a table of
``name -> pydantic config class``. The discriminated unions the API validates against and the
``/v1/capabilities`` listing are both built from these tables, so adding a component is adding one
class and one table entry. The worker's engine registers an implementation under the same name
(``tests/worker/test_component_contract.py`` keeps the two in step).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _union(table: dict[str, type[Config]], key: str) -> Any:
    members = tuple(table.values())
    return Annotated[Union[members], Field(discriminator=key)]  # type: ignore[valid-type]


# ---- losses ------------------------------------------------------------------------------------
class KDLoss(Config):
    """Hinton soft-target KD: α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y).

    Without labels in the dataset it is the pure soft-target term.
    """

    type: Literal["kd"] = "kd"
    temperature: float = Field(4.0, gt=0, le=100, description="Softening temperature T.")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the soft-target term.")


class SoftCELoss(Config):
    """Cross-entropy against the teacher's probabilities plus an entropy term: CE(softmax(t/T), s) + w·H(softmax(s))."""

    type: Literal["soft_ce"] = "soft_ce"
    temperature: float = Field(1.0, gt=0, le=100)
    entropy_weight: float = Field(0.0, ge=-10, le=10, description="w; > 0 pushes the student to confident outputs.")


class HardLoss(Config):
    """Cross-entropy against the teacher's argmax (hard pseudo-labels); works without any labels."""

    type: Literal["hard"] = "hard"
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class MSELoss(Config):
    """Mean squared error between student and teacher outputs (regression outputs, or logits)."""

    type: Literal["mse"] = "mse"
    target: Literal["outputs", "probabilities"] = Field(
        "outputs", description="Match raw outputs/logits, or softmax probabilities (classification).")


class CosineLoss(Config):
    """1 − cos(student, teacher) per row, for embedding models; optionally plus an MSE term."""

    type: Literal["cosine"] = "cosine"
    mse_weight: float = Field(0.0, ge=0, le=100)


LOSSES: dict[str, type[Config]] = {"kd": KDLoss, "soft_ce": SoftCELoss, "hard": HardLoss, "mse": MSELoss,
                                   "cosine": CosineLoss}
Loss = _union(LOSSES, "type")


class Hint(Config):
    """Match an intermediate feature of the student to one of the teacher (FitNets-style hints)."""

    teacher: str = Field(min_length=1, max_length=200, examples=["penultimate"],
                         description="Teacher module name (or ONNX tensor name), or 'penultimate'.")
    student: str = Field("penultimate", min_length=1, max_length=200)
    weight: float = Field(1.0, ge=0, le=1000)
    distance: Literal["mse", "cosine", "attention"] = "mse"


# ---- optimisation ------------------------------------------------------------------------------
class OptimizerConfig(Config):
    type: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum; β1 for Adam/AdamW.")


OPTIMIZERS = ("adam", "adamw", "sgd")


class ScheduleConfig(Config):
    """Learning-rate schedule over the step's epochs, with linear warm-up."""

    type: Literal["constant", "cosine", "one_cycle"] = "cosine"
    warmup_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the steps spent warming up.")


SCHEDULES = ("constant", "cosine", "one_cycle")


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


class Synthesize(Config):
    """Data-free distillation: train a generator against the teacher and distill on its samples."""

    method: Literal["generator"] = "generator"
    num_samples: int = Field(10_000, ge=64, le=10_000_000)
    generator_epochs: int = Field(30, ge=1, le=10_000)
    latent_dim: int = Field(64, ge=2, le=4096)


class Coreset(Config):
    """Distill on a representative subset of the transfer set."""

    method: Literal["kmeans", "random"] = "kmeans"
    fraction: float = Field(0.25, gt=0, le=1)


# ---- student families --------------------------------------------------------------------------
Init = Literal["random", "teacher"]
_INIT = Field("random", description="'teacher' copies teacher weights where shape and role match.")


class MLPStudent(Config):
    """Fully connected student. Input and output widths are inferred from the data and the teacher."""

    family: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=lambda: [128], max_length=32)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)
    init: Init = _INIT


class CNNStudent(Config):
    """Conv blocks (conv → batch norm → ReLU → 2×2 max-pool) then a linear head; inputs N×C×H×W."""

    family: Literal["cnn"] = "cnn"
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [16, 32], min_length=1,
                                                                  max_length=8)
    kernel_size: int = Field(3, ge=1, le=11)
    hidden: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=list, max_length=4)
    dropout: float = Field(0.0, ge=0, lt=1)
    init: Init = _INIT


class ResNetStudent(Config):
    """A small residual network: a stem, ``depth`` basic blocks in 3 stages of ``width``·(1, 2, 4) channels."""

    family: Literal["resnet"] = "resnet"
    depth: int = Field(6, ge=1, le=64, description="Residual blocks in total.")
    width: int = Field(16, ge=1, le=1024)
    init: Init = _INIT


class EmbeddingBagStudent(Config):
    """Mean of token embeddings (mask-aware) → MLP head; for token-id inputs (input_ids [+ attention_mask])."""

    family: Literal["embedding_bag"] = "embedding_bag"
    embedding_dim: int | None = Field(None, ge=1, le=8192, description="Default: the teacher's, when init is teacher.")
    hidden: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=list, max_length=8)
    vocab_size: int | None = Field(None, ge=2, le=10_000_000, description="Default: inferred from teacher/data.")
    init: Init = _INIT


class TextTransformerStudent(Config):
    """A small Transformer encoder over token ids with an attention mask; mean-pooled output head."""

    family: Literal["text_transformer"] = "text_transformer"
    d_model: int = Field(64, ge=8, le=4096)
    layers: int = Field(2, ge=1, le=48)
    heads: int = Field(4, ge=1, le=64)
    ff: int = Field(128, ge=8, le=16384)
    vocab_size: int | None = Field(None, ge=2, le=10_000_000)
    max_len: int | None = Field(None, ge=1, le=65536)
    init: Init = _INIT


STUDENT_FAMILIES: dict[str, type[Config]] = {"mlp": MLPStudent, "cnn": CNNStudent, "resnet": ResNetStudent,
                                             "embedding_bag": EmbeddingBagStudent,
                                             "text_transformer": TextTransformerStudent}


class UploadedStudent(Config):
    """A trainable model uploaded to /v1/models (TorchScript, torch.export or safetensors + architecture)."""

    model_id: str = Field(min_length=1, max_length=40)


class DeriveRatios(Config):
    width: float = Field(0.5, gt=0, le=1, description="Hidden widths / channels are multiplied by this.")
    depth: float = Field(1.0, gt=0, le=1, description="Hidden layers / blocks kept (every other when 0.5).")


class DerivedStudent(Config):
    """Shrink the teacher's own architecture (built-in family, or a plain Linear/Conv/activation chain)."""

    derive: DeriveRatios
    init: Init = _INIT


Student = Union[_union(STUDENT_FAMILIES, "family"), UploadedStudent, DerivedStudent]


# ---- steps -------------------------------------------------------------------------------------
class Gate(Config):
    """Quality gate: the step's output may lose at most ``max_drop`` of ``metric`` against the teacher."""

    metric: Literal["accuracy", "agreement", "f1_macro", "r2", "cosine"] = "accuracy"
    max_drop: float = Field(0.01, ge=0, le=1, description="Absolute drop allowed, e.g. 0.01 = one point.")


class InputReduction(Config):
    """Fit PCA / univariate selection on the transfer set; fold it into the student as a fixed first layer."""

    method: Literal["pca", "select_k_best"] = "pca"
    components: int = Field(16, ge=1, le=100_000)


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


class Finetune(Config):
    """Recover quality after compression by distilling from the job's original teacher."""

    epochs: int = Field(3, ge=1, le=10_000)
    loss: Loss = Field(default_factory=KDLoss)
    batch_size: int = Field(128, ge=1, le=65_536)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=1e-3))
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)


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
    finetune: Finetune | None = Field(None, description="qat: the KD training run with fake quantization.")
    gate: Gate | None = None


STEP_KINDS: dict[str, type[Config]] = {"distill": DistillStep, "prune": PruneStep, "quantize": QuantizeStep}
Step = _union(STEP_KINDS, "kind")

EXPORT_FORMATS = ("torchscript", "onnx", "safetensors")
ExportFormat = Literal["torchscript", "onnx", "safetensors"]
MetadataValue = Union[str, int, float, bool, None]
TASKS = ("classification", "regression", "embedding")
MODEL_FORMATS = ("torchscript", "onnx", "torch_export", "safetensors")
DATASET_FORMATS = ("npz", "pt", "csv", "parquet", "image_folder")


class InputSpec(Config):
    """Shape of one model input, for data-free jobs (no dataset to infer it from)."""

    shape: list[Annotated[int, Field(ge=1, le=1_000_000)]] = Field(min_length=1, max_length=6,
                                                                   description="Per-example shape, e.g. [64].")
    dtype: Literal["float32"] = "float32"
    range: tuple[float, float] = (0.0, 1.0)

    @model_validator(mode="after")
    def _ordered(self) -> InputSpec:
        if self.range[0] >= self.range[1]:
            raise ValueError("range must be [low, high] with low < high")
        return self


class JobSpec(Config):
    """What POST /v1/jobs accepts. Stored with defaults filled as the job's ``spec``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{
                "teacher_model_id": "mdl_0194f3a2c1d2a1b2c3d4e5f6a7b8",
                "dataset_id": "ds_0194f3a2c1d2a1b2c3d4e5f6a7b8",
                "student": {"family": "mlp", "hidden": [64]},
                "steps": [{"kind": "distill", "loss": {"type": "kd", "temperature": 4.0, "alpha": 0.9},
                           "epochs": 20, "batch_size": 128, "optimizer": {"type": "adamw", "lr": 0.001}}],
                "val_fraction": 0.1,
                "exports": ["torchscript", "onnx", "safetensors"],
                "seed": 0,
                "metadata": {"team": "search"},
            }]
        },
    )

    teacher_model_id: str = Field(min_length=1, max_length=40)
    dataset_id: str | None = Field(None, max_length=40, description="Transfer data; omit for data-free jobs.")
    eval_dataset_id: str | None = Field(None, max_length=40, description="Held-out data to score the result on.")
    input_spec: InputSpec | None = Field(None, description="Input shape for data-free jobs.")
    student: Student | None = None
    steps: list[Step] = Field(default_factory=lambda: [DistillStep()], min_length=1, max_length=16)
    baseline: bool = Field(False, description="Also train the student on labels alone, same budget; report both.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Held-out share when the dataset has no x_val.")
    exports: list[ExportFormat] = Field(default_factory=lambda: list(EXPORT_FORMATS), max_length=3)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    metadata: dict[Annotated[str, Field(max_length=64)], MetadataValue] = Field(default_factory=dict, max_length=50)

    @model_validator(mode="after")
    def _combinations(self) -> JobSpec:
        if len(set(self.exports)) != len(self.exports):
            raise ValueError("exports lists a format twice")
        if any(s.kind == "distill" for s in self.steps) and self.student is None:
            raise ValueError("a distill step needs a 'student' (e.g. {\"family\": \"mlp\", \"hidden\": [64]}); "
                             "without one, prune/quantize steps compress the teacher itself")
        kinds = [s.kind for s in self.steps]
        if "quantize" in kinds and any(k != "quantize" for k in kinds[kinds.index("quantize"):]):
            raise ValueError("steps after a quantize step must also be quantize steps: a quantized model cannot "
                             "be trained or pruned further (use method 'qat' to train with quantization)")
        if any(k != "distill" for k in kinds) and self.dataset_id is None:
            raise ValueError("prune and quantize steps fine-tune, calibrate and measure on the job's 'dataset_id'")
        if kinds.count("quantize") > 1:
            raise ValueError("quantize at most once per job")
        for i, step in enumerate(self.steps):
            synth = getattr(step, "synthesize", None)
            if synth is not None and self.input_spec is None:
                raise ValueError(f"steps[{i}].synthesize needs 'input_spec' (the teacher's input shape)")
            if step.kind != "distill":
                continue
            if synth is None and self.dataset_id is None and getattr(step, "dataset_id", None) is None:
                raise ValueError(f"steps[{i}] has no data: give 'dataset_id' (job or step) or 'synthesize'")
            if synth is not None and getattr(step, "coreset", None) is not None:
                raise ValueError(f"steps[{i}]: coreset selects from real data; it cannot be combined with synthesize")
        return self

    @property
    def kind(self) -> str:
        return "+".join(s.kind for s in self.steps)

    def dataset_ids(self) -> list[str]:
        """Every dataset the job reads (job-level, eval, and per-step), without duplicates."""
        ids = [self.dataset_id, self.eval_dataset_id] + [getattr(s, "dataset_id", None) for s in self.steps]
        return list(dict.fromkeys(i for i in ids if i))

    def model_ids(self) -> list[str]:
        ids = [self.teacher_model_id]
        if isinstance(self.student, UploadedStudent):
            ids.append(self.student.model_id)
        return ids


def capabilities() -> dict[str, Any]:
    """Every component this deployment offers, with the JSON schema of its config."""

    def table(components: dict[str, type[Config]], key: str) -> list[dict[str, Any]]:
        out = []
        for name, cls in components.items():
            schema = cls.model_json_schema()
            schema.get("properties", {}).pop(key, None)
            out.append({"name": name, "description": (cls.__doc__ or "").strip().split("\n")[0],
                        "config_schema": schema})
        return out

    return {
        "step_kinds": table(STEP_KINDS, "kind"),
        "losses": table(LOSSES, "type"),
        "student_families": table(STUDENT_FAMILIES, "family"),
        "student_sources": ["family", "model_id", "derive"],
        "optimizers": list(OPTIMIZERS),
        "schedules": list(SCHEDULES),
        "hint_distances": ["mse", "cosine", "attention"],
        "synthesizers": ["generator"],
        "coreset_methods": ["kmeans", "random"],
        "input_reductions": ["pca", "select_k_best"],
        "prune_methods": list(PruneStep.model_fields["method"].annotation.__args__),
        "quantize_methods": list(QuantizeStep.model_fields["method"].annotation.__args__),
        "gate_metrics": list(Gate.model_fields["metric"].annotation.__args__),
        "model_formats": list(MODEL_FORMATS),
        "tasks": list(TASKS),
        "dataset_formats": list(DATASET_FORMATS),
        "export_formats": list(EXPORT_FORMATS),
    }
