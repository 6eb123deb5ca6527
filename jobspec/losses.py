"""Loss configs (``loss.type``) and feature hints.

Which teacher tasks each loss applies to is in :data:`jobspec.rules.LOSS_TASKS`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from jobspec.base import Config, union


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
Loss = union(LOSSES, "type")

HINT_DISTANCES = ("mse", "cosine", "attention")


class Hint(Config):
    """Match an intermediate feature of the student to one of the teacher (FitNets-style hints)."""

    teacher: str = Field(min_length=1, max_length=200, examples=["penultimate"],
                         description="Teacher module name (or ONNX tensor name), or 'penultimate'.")
    student: str = Field("penultimate", min_length=1, max_length=200)
    weight: float = Field(1.0, ge=0, le=1000)
    distance: Literal["mse", "cosine", "attention"] = "mse"
