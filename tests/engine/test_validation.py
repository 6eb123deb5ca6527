"""The validate phase: bad datasets/teachers fail fast with precise codes and messages."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch

from engine import DatasetSource
from engine import EngineError
from engine import TeacherSource
from engine import run
from engine.data.dataset import Dataset, check_dataset
from engine.data.split import split_dataset

from .helpers import RecordingReporter, make_spec


def _fail(spec, teacher, dataset, tmp_path) -> EngineError:
    reporter = RecordingReporter()
    with pytest.raises(EngineError) as err:
        run(spec, teacher, dataset, tmp_path / "out", reporter, device="cpu", threads=1)
    # Nothing was trained or exported.
    assert "step_started" not in reporter.event_types()
    assert not (tmp_path / "out").exists()
    return err.value


@pytest.mark.parametrize("teacher_fixture", ["teacher_ts", "teacher_onnx"])
def test_feature_mismatch_is_shape_mismatch_and_fast(request, teacher_fixture, write_npz, tmp_path):
    teacher = request.getfixturevalue(teacher_fixture)
    rng = np.random.default_rng(0)
    ds = write_npz("twenty", x=rng.random((50, 20), dtype=np.float32), y=rng.integers(0, 10, 50))
    started = time.perf_counter()
    err = _fail(make_spec(), teacher, ds, tmp_path)
    assert time.perf_counter() - started < 5.0
    assert err.code == "shape_mismatch"
    assert "20 features per row but the teacher expects 64" in err.message


def test_torchscript_mismatch_quotes_the_teacher_error(teacher_ts, write_npz, tmp_path):
    ds = write_npz("twenty_ts", x=np.zeros((5, 20), np.float32))
    err = _fail(make_spec(), teacher_ts, ds, tmp_path)
    assert "teacher raised" in err.message and "20" in err.message and "64" in err.message


def test_per_row_shape_mismatch_names_both_shapes(teacher_onnx, write_npz, tmp_path):
    ds = write_npz("images_onnx", x=np.zeros((5, 8, 8), np.float32))
    err = _fail(make_spec(), teacher_onnx, ds, tmp_path)
    assert err.code == "shape_mismatch"
    assert "per-row shape [8, 8]" in err.message and "[64]" in err.message


def test_labels_out_of_range(digits, write_npz, teacher_ts, tmp_path):
    x, y = digits
    ds = write_npz("bad_labels", x=x[:100], y=np.where(np.arange(100) == 7, 12, y[:100]))
    err = _fail(make_spec(), teacher_ts, ds, tmp_path)
    assert err.code == "invalid_dataset"
    assert "class id 12" in err.message and "10 outputs" in err.message


@pytest.mark.parametrize(
    "arrays,fragment",
    [
        ({"features": np.zeros((4, 64), np.float32)}, "no array 'x' (found: features)"),
        ({"x": np.zeros(64, np.float32)}, "must have shape [rows, features...]"),
        ({"x": np.zeros((0, 64), np.float32)}, "has no rows"),
        ({"x": np.array([["a"] * 64] * 3)}, "must be numeric"),
        ({"x": np.full((3, 64), np.nan, np.float32)}, "NaN"),
        ({"x": np.zeros((3, 64), np.float32), "y": np.zeros(4, np.int64)}, "'y' has 4 rows but 'x' has 3"),
        ({"x": np.zeros((3, 64), np.float32), "y": np.array([0.5, 1, 2])}, "integer class ids"),
        ({"x": np.zeros((3, 64), np.float32), "y": np.array([0, -1, 2])}, "negative class id -1"),
        ({"x": np.zeros((1, 64), np.float32)}, "at least 2 rows"),
        ({"x": np.zeros((3, 64), np.float32), "y_val": np.zeros(3, np.int64)}, "'y_val' but no 'x_val'"),
        ({"x": np.zeros((3, 64), np.float32), "x_val": np.zeros((3, 63), np.float32)}, "'x_val' has per-row shape [63]"),
    ],
)
def test_bad_arrays_are_invalid_dataset(arrays, fragment, write_npz, teacher_ts, tmp_path):
    ds = write_npz(f"bad_{abs(hash(fragment))}", **arrays)
    err = _fail(make_spec(), teacher_ts, ds, tmp_path)
    assert err.code == "invalid_dataset"
    assert fragment in err.message


def test_object_arrays_are_never_unpickled(tmp_path, teacher_ts):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([object(), object()], dtype=object))
    err = _fail(make_spec(), teacher_ts, DatasetSource(path), tmp_path)
    assert err.code == "invalid_dataset" and "pickle" in err.message


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04truncated"])
def test_unreadable_npz(content, tmp_path, teacher_ts):
    path = tmp_path / "junk.npz"
    path.write_bytes(content)
    err = _fail(make_spec(), teacher_ts, DatasetSource(path), tmp_path)
    assert err.code == "invalid_dataset"


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_unloadable_teacher_is_invalid_model(fmt, digits_npz, tmp_path):
    path = tmp_path / "teacher.bin"
    path.write_bytes(b"\x00garbage" * 100)
    err = _fail(make_spec(), TeacherSource(path, fmt), digits_npz, tmp_path)
    assert err.code == "invalid_model"
    err = _fail(make_spec(), TeacherSource(tmp_path / "missing", fmt), digits_npz, tmp_path)
    assert err.code == "invalid_model" and "not found" in err.message


def test_teacher_with_non_logit_output(digits_npz, tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            return x.sum(dim=1)  # [N], not [N, C]

    path = tmp_path / "bad.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Bad()), str(path))
    err = _fail(make_spec(), TeacherSource(path, "torchscript"), digits_npz, tmp_path)
    assert err.code == "shape_mismatch" and "expected 2-D logits" in err.message


def test_unsupported_formats_tasks_inputs_and_devices(teacher_ts, digits_npz, tmp_path):
    assert _fail(make_spec(), TeacherSource(teacher_ts.path, "tflite"), digits_npz, tmp_path).code == "unsupported"
    assert _fail(make_spec(), TeacherSource(teacher_ts.path, "torchscript", task="segmentation"), digits_npz, tmp_path).code == "unsupported"
    err = _fail(make_spec(), TeacherSource(teacher_ts.path, "torchscript", task="regression"), digits_npz, tmp_path)
    assert err.code == "invalid_spec" and "'kd' does not apply to a regression teacher; use one of: mse" in err.message
    assert _fail(make_spec(), teacher_ts, DatasetSource(digits_npz.path, format="tfrecord"), tmp_path).code == "unsupported"
    err = _fail(make_spec(), teacher_ts, DatasetSource(digits_npz.path, inputs=("x", "mask")), tmp_path)
    assert err.code == "invalid_dataset" and "no array 'mask'" in err.message
    assert _fail(make_spec(step__epochs=-1), teacher_ts, digits_npz, tmp_path).code == "invalid_spec"
    if not torch.cuda.is_available():
        with pytest.raises(EngineError) as err:
            run(make_spec(), teacher_ts, digits_npz, tmp_path / "o", RecordingReporter(), device="cuda")
        assert err.value.code == "unsupported"


def test_split_is_deterministic_and_holds_out_at_least_one_row():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    y = np.arange(20) % 3
    ds = check_dataset(["x"], {"x": x}, y, None, None)
    a, b, c = split_dataset(ds, 0.25, 7), split_dataset(ds, 0.25, 7), split_dataset(ds, 0.25, 8)
    assert a.val_source == "split" and a.n_val == 5 and a.n_train == 15
    np.testing.assert_array_equal(a.x_val["x"], b.x_val["x"])
    assert not np.array_equal(a.x_val["x"], c.x_val["x"])
    # Held-out and training rows partition the data, labels stay aligned.
    assert sorted(np.concatenate([a.x_val["x"][:, 0], a.x_train["x"][:, 0]]).tolist()) == x[:, 0].tolist()
    np.testing.assert_array_equal(a.y_val, (a.x_val["x"][:, 0] / 2).astype(int) % 3)
    assert split_dataset(ds, 0.0, 0).n_val == 1


def test_explicit_held_out_arrays_are_used():
    ds = Dataset(["x"], {"x": np.zeros((5, 2), np.float32)}, None, {"x": np.ones((3, 2), np.float32)}, None)
    s = split_dataset(ds, 0.5, 0)
    assert s.val_source == "x_val" and s.n_train == 5 and s.n_val == 3
