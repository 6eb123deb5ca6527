"""Distillation losses (registry ``losses``, selected by ``loss.type``).

A loss instance is called as ``loss(student_logits, teacher_logits, labels)``:

* ``student_logits``: float tensor [B, C] (requires grad)
* ``teacher_logits``: float tensor [B, C] (cached, no grad)
* ``labels``: int64 tensor [B] of class ids, or ``None`` for unlabelled data

and returns a scalar tensor (mean over the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .registry import check, losses


@losses.register("kd")
class KDLoss:
    """Hinton et al. knowledge distillation.

    With labels:    alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(s, y)
    Without labels: T^2 * KL(p_t || p_s)  (alpha is ignored)

    where p_t = softmax(t / T), p_s = softmax(s / T). The T^2 factor keeps the
    soft-target gradients on the same scale as the hard-label ones as T grows.
    """

    @dataclass(frozen=True)
    class Config:
        temperature: float = 4.0
        alpha: float = 0.9

        def __post_init__(self) -> None:
            check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
            check(0.0 <= self.alpha <= 1.0, f"alpha must be between 0 and 1, got {self.alpha}")

    def __init__(self, config: Config):
        self.config = config

    def __call__(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        t = self.config.temperature
        # log_target=True keeps both sides in log space: no log(0) for confident
        # teachers. "batchmean" is the mathematically correct KL mean per row.
        soft = F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)
        if labels is None:
            return soft
        alpha = self.config.alpha
        hard = F.cross_entropy(student_logits, labels)
        return alpha * soft + (1.0 - alpha) * hard
