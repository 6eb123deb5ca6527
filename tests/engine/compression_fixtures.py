"""Helpers of the compression tests: digits split, a trained teacher MLP (64-1200-1200-10) and a small
trained CNN on 1x8x8 digits, a tiny KD fine-tune loop.

The fixtures ``split``, ``teacher`` and ``cnn`` (tests/engine/conftest.py) return these; test modules import
only the helper functions. Everything is cached and seeded, so the models train once per session.
"""

from __future__ import annotations

import io
import warnings
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "accuracy",
    "predict",
    "kd_finetune",
    "ts_roundtrip",
    "make_mlp",
    "make_cnn",
]

torch.set_num_threads(1)


@lru_cache(maxsize=1)
def _split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte)


def make_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 1200), nn.ReLU(), nn.Linear(1200, 1200), nn.ReLU(), nn.Linear(1200, 10))


def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 1e-3) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@lru_cache(maxsize=1)
def _teacher() -> nn.Module:
    xtr, ytr, _, _ = _split()
    torch.manual_seed(0)
    return _train(make_mlp(), xtr, ytr, epochs=8)


@lru_cache(maxsize=1)
def _cnn() -> nn.Module:
    xtr, ytr, _, _ = _split()
    torch.manual_seed(0)
    return _train(make_cnn(), xtr.view(-1, 1, 8, 8), ytr, epochs=10, lr=3e-3)


def predict(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y).float().mean())


def kd_finetune(student: nn.Module, teacher, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 2, lr: float = 5e-4,
                temperature: float = 2.0, after_step=None) -> nn.Module:
    """A tiny KD loop: soft cross-entropy to the teacher's logits (T=2) + hard labels.
    ``after_step(student)`` runs after every optimizer step (e.g. re-applying pruning masks)."""
    with torch.no_grad():
        t_logits = teacher(x)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(1)
    student.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            s = student(x[idx])
            soft = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t_logits[idx] / temperature, 1), reduction="batchmean")
            loss = soft * temperature**2 + F.cross_entropy(s, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(student)
    return student.eval()


def ts_roundtrip(model: nn.Module, example: tuple[torch.Tensor, ...], how: str = "trace") -> torch.jit.ScriptModule:
    """Trace or script ``model``, save it to bytes and load it back."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            s = torch.jit.trace(model.eval(), example, check_trace=False) if how == "trace" else torch.jit.script(model.eval())
        buf = io.BytesIO()
        torch.jit.save(s, buf)
        buf.seek(0)
        return torch.jit.load(buf, map_location="cpu")
