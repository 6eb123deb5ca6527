"""Loss configs (``loss.type``) and feature hints.

Which teacher tasks each loss applies to is in :data:`jobspec.rules.LOSS_TASKS`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from jobspec.base import Config, auto_or_within, union


class KDLoss(Config):
    """Hinton soft-target KD: α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y).

    Without labels in the dataset it is the pure soft-target term.
    """

    type: Literal["kd"] = "kd"
    temperature: float | Literal["auto"] = Field(4.0, description="Softening temperature T, or 'auto': a short "
                                                                  "sweep over 1, 2, 4, 8 on a slice picks it.")

    _temperature = field_validator("temperature")(lambda v: auto_or_within(v, 0, 100, "temperature"))
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


class TokenKDLoss(Config):
    """Token-level KD for generative LMs: a divergence between the teacher's and the student's next-token
    distributions at every position, optionally mixed with cross-entropy on the data's tokens.

    loss = (1 − sft_weight)·T²·D(p_teacher^T, p_student^T) + sft_weight·CE(student, data). ``divergence``:
    ``forward_kl`` KL(p_t ‖ p_s) (Hinton et al. 2015; mode-covering), ``reverse_kl`` KL(p_s ‖ p_t) (MiniLLM, Gu
    et al. 2024; mode-seeking), ``jsd`` the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024)
    with ``beta`` (0 → forward KL, 1 → reverse KL), ``tvd`` total variation. ``top_k``: keep the teacher's
    distribution as its k most likely tokens plus the remaining (tail) mass, so the cached teacher targets
    take k numbers per token instead of the vocabulary size.
    """

    type: Literal["token_kd"] = "token_kd"
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1, description="jsd: the mixture weight β of GKD's generalized JSD.")
    temperature: float = Field(1.0, gt=0, le=100, description="Softening temperature T of both distributions.")
    top_k: int | None = Field(None, ge=1, le=1_000_000,
                              description="Keep the teacher's k most likely tokens + tail mass (None: all).")
    sft_weight: float = Field(0.1, ge=0, le=1, description="Weight of cross-entropy on the data's own tokens "
                                                            "(a little keeps the student anchored to the data).")


LOSSES: dict[str, type[Config]] = {"kd": KDLoss, "soft_ce": SoftCELoss, "hard": HardLoss, "mse": MSELoss,
                                   "cosine": CosineLoss, "token_kd": TokenKDLoss}
Loss = union(LOSSES, "type")

HINT_DISTANCES = ("mse", "cosine", "attention")


class Hint(Config):
    """Match an intermediate feature of the student to one of the teacher (FitNets-style hints)."""

    teacher: str = Field(min_length=1, max_length=200, examples=["penultimate"],
                         description="Teacher module name (or ONNX tensor name), or 'penultimate'.")
    student: str = Field("penultimate", min_length=1, max_length=200)
    weight: float = Field(1.0, ge=0, le=1000)
    distance: Literal["mse", "cosine", "attention"] = "mse"
