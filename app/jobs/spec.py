"""The job spec: typed, validated component configs (no torch).

Each component kind (step kinds, losses, student families, optimizers) is a table of
``name -> pydantic config class``. The discriminated unions the API validates against and the
``/v1/capabilities`` listing are both built from these tables, so adding a component is adding one
class and one table entry. The worker's engine registers an implementation under the same name
(a test keeps the two in step).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- losses ------------------------------------------------------------------------------------
class KDLoss(Config):
    """Hinton soft-target KD: α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y).

    Without labels in the dataset it is the pure soft-target term.
    """

    type: Literal["kd"] = "kd"
    temperature: float = Field(4.0, gt=0, le=100, description="Softening temperature T.")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the soft-target term.")


LOSSES: dict[str, type[Config]] = {"kd": KDLoss}

# ---- optimizers --------------------------------------------------------------------------------
class OptimizerConfig(Config):
    type: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only.")


OPTIMIZERS = ("adam", "adamw", "sgd")

# ---- student families --------------------------------------------------------------------------
class MLPStudent(Config):
    """Fully connected student. Input and output widths are inferred from the data and the teacher."""

    family: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=lambda: [128], max_length=32)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)


STUDENT_FAMILIES: dict[str, type[Config]] = {"mlp": MLPStudent}

# ---- steps -------------------------------------------------------------------------------------
Loss = Annotated[Union[tuple(LOSSES.values())], Field(discriminator="type")]  # type: ignore[valid-type]


class DistillStep(Config):
    """Train the student to imitate the teacher."""

    kind: Literal["distill"] = "distill"
    loss: Loss = Field(default_factory=KDLoss)
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)


STEP_KINDS: dict[str, type[Config]] = {"distill": DistillStep}

Step = Annotated[Union[tuple(STEP_KINDS.values())], Field(discriminator="kind")]  # type: ignore[valid-type]
Student = Annotated[Union[tuple(STUDENT_FAMILIES.values())], Field(discriminator="family")]  # type: ignore[valid-type]

EXPORT_FORMATS = ("torchscript", "onnx", "safetensors")
ExportFormat = Literal["torchscript", "onnx", "safetensors"]
MetadataValue = Union[str, int, float, bool, None]


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
    dataset_id: str = Field(min_length=1, max_length=40)
    student: Student | None = None
    steps: list[Step] = Field(default_factory=lambda: [DistillStep()], min_length=1, max_length=16)
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Held-out share when the dataset has no x_val.")
    exports: list[ExportFormat] = Field(default_factory=lambda: list(EXPORT_FORMATS), max_length=3)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    metadata: dict[Annotated[str, Field(max_length=64)], MetadataValue] = Field(default_factory=dict, max_length=50)

    @model_validator(mode="after")
    def _combinations(self) -> JobSpec:
        if len(set(self.exports)) != len(self.exports):
            raise ValueError("exports lists a format twice")
        if any(s.kind == "distill" for s in self.steps) and self.student is None:
            raise ValueError("a distill step needs a 'student' (e.g. {\"family\": \"mlp\", \"hidden\": [64]})")
        return self

    @property
    def kind(self) -> str:
        return "+".join(s.kind for s in self.steps)


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
        "optimizers": list(OPTIMIZERS),
        "model_formats": ["torchscript", "onnx"],
        "tasks": ["classification"],
        "dataset_formats": ["npz"],
        "export_formats": list(EXPORT_FORMATS),
    }
