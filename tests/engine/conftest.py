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
from engine.report.card import write_plots as _DRAW_PLOTS  # the real one, bound before any test stubs it

from tests.support.shared import built_once

from . import compression_fixtures
from .helpers import ALL_EXPORTS, RecordingReporter, make_spec

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _plots_only_where_asked(request, monkeypatch):
    """Drawing the report's two plots is most of a small job's cost inside this process (~0.4 s of ~0.5 s):
    only tests marked ``plots`` and the shared whole jobs (:func:`_whole_job`) draw them."""
    if request.node.get_closest_marker("plots") is None:
        from engine.report import card

        monkeypatch.setattr(card, "write_plots", lambda *args, **kwargs: [])


def _whole_job(spec, teacher, data, out):
    """``run`` with everything a job delivers, plots included (whatever the requesting test's fixtures stubbed:
    a session fixture may be first asked for in the middle of a test, by ``request.getfixturevalue``)."""
    from engine import run
    from engine.report import card

    reporter = RecordingReporter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(card, "write_plots", _DRAW_PLOTS)
        result = run(spec, teacher, data, out, reporter, device="cpu", threads=1)
    return result, reporter, out


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
    """One full job with the TorchScript teacher and every export, shared by several tests."""
    return _whole_job(make_spec(exports=ALL_EXPORTS), teacher_ts, digits_npz, tmp_path_factory.mktemp("ts_run"))


@pytest.fixture(scope="session")
def onnx_run(teacher_onnx, digits_npz, tmp_path_factory):
    """One full job with the ONNX teacher."""
    return _whole_job(make_spec(), teacher_onnx, digits_npz, tmp_path_factory.mktemp("onnx_run"))


# ---- shared with the compression tests (tests/engine/compression_fixtures.py) ----------------------
@pytest.fixture(scope="session")
def split():
    """(x_train [1347, 64], y_train, x_test [450, 64], y_test) float32 / int64 tensors."""
    return compression_fixtures._split()


def _trained_once(tmp_path_factory, name: str, train, make) -> torch.nn.Module:
    """``train()``'s model, trained by the first process of the run that needs it; the others (pytest-xdist
    workers) load its weights into ``make()`` — seeded training gives every process the same weights."""
    with built_once(tmp_path_factory, name) as (directory, build):
        if build:
            model = train()
            torch.save(model.state_dict(), directory / "weights.pt")
            return model
    model = make()
    model.load_state_dict(torch.load(directory / "weights.pt", weights_only=True))
    return model.eval()


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """Trained 64-1200-1200-10 MLP (eval mode); do not modify it in a test."""
    return _trained_once(tmp_path_factory, "compression-teacher", compression_fixtures._teacher,
                         compression_fixtures.make_mlp)


@pytest.fixture(scope="session")
def cnn(tmp_path_factory):
    """Trained small CNN on [N, 1, 8, 8] digits (eval mode)."""
    return _trained_once(tmp_path_factory, "compression-cnn", compression_fixtures._cnn, compression_fixtures.make_cnn)


# ---- an embedding teacher on token sequences (tests/engine/test_formats_tasks.py, test_method_matrix.py) ---
class TinyEncoder(torch.nn.Module):
    def __init__(self, vocab=50, d=32, out=16, max_len=12):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(max_len, d) * 0.1)
        self.layer = torch.nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.proj = torch.nn.Linear(d, out)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) + self.pos[: input_ids.shape[1]]
        h = self.layer(h, src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).float()
        return self.proj((h * m).sum(1) / m.sum(1).clamp_min(1.0))


@pytest.fixture(scope="session")
def token_data(tmp_path_factory):
    """(embedding teacher: a two-input transformer traced to TorchScript, npz of input_ids + attention_mask)."""
    g = np.random.default_rng(0)
    n, L, vocab = 1200, 12, 50
    lengths = g.integers(4, L + 1, n)
    ids = g.integers(1, vocab, (n, L)).astype(np.int64)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int64)
    ids = ids * mask
    # "train" the teacher briefly: predict which of 4 token ranges dominates (gives it structure)
    torch.manual_seed(0)
    model = TinyEncoder()
    head = torch.nn.Linear(16, 4)
    target = torch.from_numpy(np.stack([((ids >= lo) & (ids < lo + 13) & (mask == 1)).sum(1)
                                        for lo in (1, 13, 26, 38)], 1).argmax(1))
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=3e-3)
    ti, tm = torch.from_numpy(ids), torch.from_numpy(mask)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(head(model(ti, tm)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    base = tmp_path_factory.mktemp("tokens")
    path = base / "encoder.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (ti[:4], tm[:4]), check_trace=False)
        torch.jit.save(traced, str(path))
    npz = base / "tokens.npz"
    np.savez(npz, input_ids=ids, attention_mask=mask)
    return TeacherSource(path, "torchscript", task="embedding"), DatasetSource(npz, inputs=("input_ids", "attention_mask"))
