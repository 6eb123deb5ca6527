"""Hint losses: match an intermediate student feature to a teacher feature (FitNets, attention transfer).

Each hint adds w·D(adapter(student feature), teacher feature) to the step's loss. One :class:`HintLoss` per spec ``hints[i]``::

    hint = HintLoss("mse", teacher_shape=(256,), student_shape=(32,))
    loss = hint(student_feat, teacher_feat)          # [B, *student_shape], [B, *teacher_shape] -> scalar

``hint`` is an ``nn.Module``: its adapter's parameters must be trained together with the student
(add ``hint.parameters()`` to the optimizer). Per-row feature shapes are read as

* ``(D,)``        vectors:            adapter ``Linear(D_s, D_t)`` when widths differ
* ``(C, H, W)``   feature maps:       adapter 1×1 ``Conv2d(C_s, C_t)`` when channels differ; when H×W
                                       differ both maps are adaptive-average-pooled to the smaller size
* ``(L, D)``      token features:     ``Linear(D_s, D_t)`` on the last axis; lengths pooled to the smaller
* anything else, or different ranks:  flattened to vectors, then as vectors

Distances (means over the batch):

* ``mse``:        mean over all elements of (adapter(s) − t)²
* ``cosine``:     mean over rows of 1 − cos(flatten(adapter(s)), flatten(t))
* ``attention``:  attention transfer (Zagoruyko & Komodakis 2017): the per-sample map a = Σ_c f²
                  (over channels for C×H×W, over D for L×D, elementwise for vectors), pooled to the
                  smaller spatial size, flattened and L2-normalised; the loss is the mean over all
                  elements of (q_s − q_t)² (as the authors' reference code). No adapter.

References: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for Thin
Deep Nets", ICLR 2015 (hints through a learned regressor: ``mse`` with the adapter); S. Zagoruyko,
N. Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional Neural
Networks via Attention Transfer", ICLR 2017 (``attention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InvalidSpec, ShapeMismatch

DISTANCES = ("mse", "cosine", "attention")


def _kind(shape: tuple[int, ...]) -> str:
    return {1: "vector", 2: "tokens", 3: "map"}.get(len(shape), "other")


class HintLoss(nn.Module):
    def __init__(self, distance: str, teacher_shape: tuple[int, ...], student_shape: tuple[int, ...]):
        super().__init__()
        if distance not in DISTANCES:
            raise InvalidSpec(f"hint distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        self.distance = distance
        self.teacher_shape = tuple(int(d) for d in teacher_shape)
        self.student_shape = tuple(int(d) for d in student_shape)
        ks, kt = _kind(self.student_shape), _kind(self.teacher_shape)
        self.mode = ks if ks == kt and ks != "other" else "flat"
        self.adapter: nn.Module = nn.Identity()
        if distance == "attention":
            return
        s, t = self.student_shape, self.teacher_shape
        if self.mode == "map" and s[0] != t[0]:
            self.adapter = nn.Conv2d(s[0], t[0], kernel_size=1)
        elif self.mode in ("vector", "tokens") and s[-1] != t[-1]:
            self.adapter = nn.Linear(s[-1], t[-1])
        elif self.mode == "flat" and math.prod(s) != math.prod(t):
            self.adapter = nn.Linear(math.prod(s), math.prod(t))

    def extra_repr(self) -> str:
        return f"distance={self.distance!r}, student={self.student_shape}, teacher={self.teacher_shape}"

    def _check(self, x: torch.Tensor, shape: tuple[int, ...], who: str) -> None:
        if tuple(x.shape[1:]) != shape:
            raise ShapeMismatch(f"{who} hint feature has rows of shape {list(x.shape[1:])}, "
                                                f"expected {list(shape)}")

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        self._check(student_feat, self.student_shape, "student")
        self._check(teacher_feat, self.teacher_shape, "teacher")
        t = teacher_feat.detach().to(student_feat.dtype)
        if self.distance == "attention":
            return self._attention(student_feat, t)
        s = student_feat
        b = s.shape[0]
        if self.mode == "flat":
            s, t = s.reshape(b, -1), t.reshape(b, -1)
        s = self.adapter(s)
        if self.mode == "map" and s.shape[-2:] != t.shape[-2:]:
            size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
            s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
        elif self.mode == "tokens" and s.shape[1] != t.shape[1]:
            n = min(s.shape[1], t.shape[1])
            s = F.adaptive_avg_pool1d(s.transpose(1, 2), n).transpose(1, 2)
            t = F.adaptive_avg_pool1d(t.transpose(1, 2), n).transpose(1, 2)
        if self.distance == "mse":
            return F.mse_loss(s, t)
        return (1.0 - F.cosine_similarity(s.reshape(b, -1), t.reshape(b, -1), dim=1, eps=1e-8)).mean()

    def _attention(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a_s, a_t = attention_map(s), attention_map(t)
        if a_s.dim() != a_t.dim():
            a_s, a_t = a_s.reshape(a_s.shape[0], -1), a_t.reshape(a_t.shape[0], -1)
        if a_s.shape[1:] != a_t.shape[1:]:
            if a_s.dim() == 3:
                size = (min(a_s.shape[1], a_t.shape[1]), min(a_s.shape[2], a_t.shape[2]))
                a_s = F.adaptive_avg_pool2d(a_s.unsqueeze(1), size).squeeze(1)
                a_t = F.adaptive_avg_pool2d(a_t.unsqueeze(1), size).squeeze(1)
            else:
                n = min(a_s.shape[1], a_t.shape[1])
                a_s = F.adaptive_avg_pool1d(a_s.unsqueeze(1), n).squeeze(1)
                a_t = F.adaptive_avg_pool1d(a_t.unsqueeze(1), n).squeeze(1)
        b = s.shape[0]
        q_s = F.normalize(a_s.reshape(b, -1), dim=1)
        q_t = F.normalize(a_t.reshape(b, -1), dim=1)
        return (q_s - q_t).pow(2).mean()


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """Σ_c f² per sample: [B,C,H,W] -> [B,H,W]; [B,L,D] -> [B,L]; [B,D] -> [B,D]; else flattened."""
    if f.dim() == 4:
        return f.pow(2).sum(dim=1)
    if f.dim() == 3:
        return f.pow(2).sum(dim=2)
    return f.reshape(f.shape[0], -1).pow(2)
