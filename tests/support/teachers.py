"""Real teachers trained inside the tests on scikit-learn's bundled digits (no downloads)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Digits:
    x_train: np.ndarray  # N×64 float32 in [0, 1]
    y_train: np.ndarray  # N int64
    x_test: np.ndarray
    y_test: np.ndarray


def digits(seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(len(x) * 0.8)
    return Digits(x[:cut], y[:cut], x[cut:], y[cut:])


def save_digits(d: Digits, path: Path) -> None:
    np.savez(path, x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test)


def load_digits(path: Path) -> Digits:
    with np.load(path) as f:
        return Digits(f["x_train"], f["y_train"], f["x_test"], f["y_test"])


def train_mlp_teacher(d: Digits, hidden: int = 256, epochs: int = 40, seed: int = 0):
    """A 64→hidden→hidden→10 MLP trained to ≥0.95 test accuracy in a few seconds on a CPU."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.from_numpy(d.x_train), torch.from_numpy(d.y_train)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def save_torchscript(model, path: Path) -> Path:
    import torch

    torch.jit.save(torch.jit.script(model), str(path))
    return path


def save_onnx(model, path: Path, in_features: int = 64) -> Path:
    import torch

    torch.onnx.export(model, (torch.zeros(1, in_features),), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17)
    return path


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
