"""The top-k form of a teacher's next-token distribution (:class:`TopK`): what
:func:`~engine.lm.divergence.teacher_targets` returns for ``top_k < V``, what :class:`~engine.lm.cache.TeacherCache`
stores, and what a served teacher scores as. Its own module so that both import it without a cycle; re-exported from
:mod:`engine.lm.divergence`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TopK:
    """The teacher's next-token distribution at temperature T kept as its k most likely tokens.

    logprobs: [B, T, k] float32 log-probabilities (of softmax(teacher_logits / T)); indices: [B, T, k] int64 token ids.
    The tail mass (the probability of every other token) is 1 - exp(logprobs).sum(-1).
    """

    logprobs: torch.Tensor
    indices: torch.Tensor

    def tail_mass(self) -> torch.Tensor:
        """[B, T] probability of the tokens outside the k, clamped to [0, 1] (float16-stored log-probs can sum
        to a little over 1)."""
        return (1.0 - self.logprobs.float().exp().sum(-1)).clamp(0.0, 1.0)

    def to(self, device: torch.device | str) -> TopK:
        return TopK(self.logprobs.to(device), self.indices.to(device))
