"""Shared fixtures: the digits data set, a trained teacher (TorchScript + ONNX), npz files.

Everything is session-scoped and seeded; the teacher trains in about a second.
Tests run torch single-threaded: the models are tiny, and on a shared 2-core
machine a second thread mostly waits on the scheduler.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from engine import DatasetSource
from engine import TeacherSource

from .helpers import RecordingReporter, make_spec

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """x float32 [1797, 64] in [0, 1], y int64 [1797] in 0..9."""
    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def _train_teacher(x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def teacher_module(digits) -> torch.nn.Module:
    """64 -> 256 -> 256 -> 10 MLP, trained on 1400 rows; >= 0.95 on the other 397."""
    x, y = digits
    perm = np.random.default_rng(1).permutation(len(x))
    train, test = perm[:1400], perm[1400:]
    model = _train_teacher(x[train], y[train])
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean())
    assert acc >= 0.95, f"fixture teacher only reached {acc:.3f}"
    return model


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="session")
def teacher_ts(teacher_module, artifacts_dir) -> TeacherSource:
    path = artifacts_dir / "teacher.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(teacher_module), str(path))
    return TeacherSource(path=path, format="torchscript")


@pytest.fixture(scope="session")
def teacher_onnx(teacher_module, artifacts_dir) -> TeacherSource:
    path = artifacts_dir / "teacher.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            teacher_module,
            (torch.zeros(2, 64),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
    return TeacherSource(path=path, format="onnx")


@pytest.fixture(scope="session")
def write_npz(artifacts_dir):
    """write_npz(name, **arrays) -> DatasetSource for a fresh .npz file."""

    def write(name: str, **arrays) -> DatasetSource:
        path = artifacts_dir / f"{name}.npz"
        np.savez(path, **arrays)
        return DatasetSource(path=path)

    return write


@pytest.fixture(scope="session")
def digits_npz(digits, write_npz) -> DatasetSource:
    x, y = digits
    return write_npz("digits", x=x, y=y)


@pytest.fixture(scope="session")
def ts_run(teacher_ts, digits_npz, tmp_path_factory):
    """One full job with the TorchScript teacher, shared by several tests."""
    from engine import run

    reporter = RecordingReporter()
    out = tmp_path_factory.mktemp("ts_run")
    result = run(make_spec(), teacher_ts, digits_npz, out, reporter, device="cpu", threads=1)
    return result, reporter, out


@pytest.fixture(scope="session")
def onnx_run(teacher_onnx, digits_npz, tmp_path_factory):
    """One full job with the ONNX teacher."""
    from engine import run

    reporter = RecordingReporter()
    out = tmp_path_factory.mktemp("onnx_run")
    result = run(make_spec(), teacher_onnx, digits_npz, out, reporter, device="cpu", threads=1)
    return result, reporter, out
