"""End-to-end jobs: accuracy, exports, report, progress, determinism, unlabelled data, cancel."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from engine import Cancelled
from engine import EngineResult
from engine import run
from engine.export.formats import load_safetensors_student
from engine.students.architecture import from_architecture

from .helpers import RecordingReporter, make_spec


def _artifact(result: EngineResult, kind: str, fmt: str):
    """The final step's artifact of this kind and format (every step exports its output)."""
    matches = [a for a in result.artifacts if a.kind == kind and a.format == fmt]
    last = max((a.step_index for a in matches), default=None)
    matches = [a for a in matches if a.step_index == last]
    assert len(matches) == 1, result.artifacts
    return matches[0]


def _val_rows(digits, result):
    """The held-out rows the job used (seeded split, same rule as the engine)."""
    x, y = digits
    n_val = result.report["data"]["val_rows"]
    perm = np.random.default_rng(0).permutation(len(x))
    idx = np.sort(perm[:n_val])
    return x[idx], y[idx]


def _jit_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path))


@pytest.mark.parametrize("job", ["ts_run", "onnx_run"])
def test_student_learns_from_teacher(request, job):
    result, reporter, _ = request.getfixturevalue(job)
    student, teacher = result.metrics["student"], result.metrics["teacher"]
    assert student["accuracy"] >= 0.90, student
    assert student["agreement"] >= 0.90, student
    assert 0.0 < student["f1_macro"] <= 1.0
    assert teacher["accuracy"] >= 0.95
    print(f"{job}: teacher {teacher}, student {student}")


def test_artifacts_are_listed_with_kinds_formats_and_steps(ts_run):
    result, _, out = ts_run
    got = sorted((a.kind, a.format, a.step_index, a.media_type) for a in result.artifacts)
    assert got == sorted(
        [
            ("student", "torchscript", 0, "application/octet-stream"),
            ("student", "onnx", 0, "application/octet-stream"),
            ("student", "safetensors", 0, "application/octet-stream"),
            ("architecture", "json", 0, "application/json"),
            ("report", "json", None, "application/json"),
            ("model_card", "markdown", None, "text/markdown"),
            ("plot", "png", None, "image/png"),
            ("plot", "png", None, "image/png"),
        ]
    )
    for a in result.artifacts:
        assert a.path.parent == out and a.path.stat().st_size > 0


def test_exports_agree_with_each_other(ts_run, digits):
    result, _, _ = ts_run
    x_val, y_val = _val_rows(digits, result)
    xt = torch.from_numpy(x_val)

    ts = _jit_load(_artifact(result, "student", "torchscript").path).eval()
    with torch.no_grad():
        ts_logits = ts(xt)
    ts_pred = ts_logits.argmax(1).numpy()
    # The engine measured its accuracy on the same rows with the in-memory model.
    assert float((ts_pred == y_val).mean()) == pytest.approx(result.metrics["student"]["accuracy"])

    session = ort.InferenceSession(str(_artifact(result, "student", "onnx").path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    onnx_logits = session.run(["logits"], {"x": x_val})[0]
    np.testing.assert_array_equal(onnx_logits.argmax(1), ts_pred)
    np.testing.assert_allclose(onnx_logits, ts_logits.numpy(), atol=1e-4)
    # Dynamic batch axis: one row works too.
    assert session.run(["logits"], {"x": x_val[:1]})[0].shape == (1, 10)

    arch = json.loads(_artifact(result, "architecture", "json").path.read_text())
    assert arch["family"] == "mlp" and arch["in_features"] == 64 and arch["hidden"] == [32] and arch["out_features"] == 10
    rebuilt = from_architecture(arch)
    rebuilt.load_state_dict(load_file(str(_artifact(result, "student", "safetensors").path)))
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(xt), ts_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_safetensors_student(_artifact(result, "student", "safetensors").path).eval()(xt), ts_logits)


def test_report_layout_and_numbers(ts_run):
    result, _, _ = ts_run
    report = result.report
    on_disk = json.loads(_artifact(result, "report", "json").path.read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(report) >= {
        "teacher", "steps", "student", "compression_ratio", "parameter_ratio", "speedup", "reproducibility", "data"
    }
    row_keys = {"num_parameters", "nonzero_parameters", "size_bytes", "size_gzip_bytes", "latency_ms", "accuracy",
                "agreement", "f1_macro"}
    assert set(report["teacher"]) == row_keys | {"format"} and set(report["student"]) == row_keys
    assert report["teacher"]["num_parameters"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert report["student"]["num_parameters"] == 64 * 32 + 32 + 32 * 10 + 10
    assert report["student"]["size_bytes"] == _artifact(result, "student", "torchscript").path.stat().st_size
    for row in (report["teacher"], report["student"]):
        assert row["latency_ms"]["batch_1"] > 0 and row["latency_ms"]["batch_32"] > 0
    assert report["compression_ratio"] > 1
    assert report["parameter_ratio"] == pytest.approx(report["teacher"]["num_parameters"] / report["student"]["num_parameters"])
    assert report["speedup"] > 0
    (step,) = report["steps"]
    assert step["index"] == 0 and step["kind"] == "distill" and step["method"] == "kd"
    # the default plateau schedule reports its cuts and the epoch whose weights it kept
    assert set(step) == row_keys | {"index", "kind", "method", "data", "exports", "schedule", "early_stopping"}
    assert step["exports"]["torchscript"]["accuracy"] == pytest.approx(step["accuracy"])
    repro = report["reproducibility"]
    assert repro["seed"] == 0 and set(repro["versions"]) == {"torch", "numpy", "onnxruntime", "python"}
    assert len(repro["spec_sha256"]) == 64 and len(repro["data_sha256"]) == 64 and len(repro["teacher_sha256"]) == 64
    assert report["data"]["train_rows"] + report["data"]["val_rows"] == 1797
    assert report["data"]["val_rows"] == 180 and report["data"]["val_source"] == "split"


def test_progress_metrics_and_events(ts_run):
    _, reporter, _ = ts_run
    fractions = [p["fraction"] for p in reporter.progresses]
    # one update when the step starts, then one per epoch
    assert len(fractions) == 26 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert reporter.progresses[0]["epoch"] == 0 and fractions[0] == 0.0
    last = reporter.progresses[-1]
    assert last["step_index"] == 0 and last["step_kind"] == "distill" and last["epoch"] == last["epochs"] == 25
    assert all(p["eta_seconds"] is None or p["eta_seconds"] >= 0 for p in reporter.progresses)
    names = {(m["name"], m["epoch"]) for m in reporter.metrics}
    for epoch in range(1, 26):
        assert {("train_loss", epoch), ("val_accuracy", epoch), ("val_agreement", epoch)} <= names
    losses = [m["value"] for m in reporter.metrics if m["name"] == "train_loss"]
    assert losses[-1] < losses[0]
    types = reporter.event_types()
    order = ["validate", "load", "teacher_outputs", "step_started", "early_stopping", "step_finished", "export",
             "report", "timings"]
    assert [t for i, t in enumerate(types) if t not in types[:i]] == order


def test_same_seed_is_bit_identical_and_other_seed_differs(teacher_ts, digits_npz, tmp_path):
    # Dropout makes the run consume the global RNG during training too.
    spec = make_spec(step__epochs=3, exports=["safetensors"],
                     student={"family": "mlp", "hidden": [32], "activation": "gelu", "dropout": 0.1})

    def weights(seed, name):
        result = run({**spec, "seed": seed}, teacher_ts, digits_npz, tmp_path / name, RecordingReporter(), device="cpu", threads=1)
        return load_file(str(_artifact(result, "student", "safetensors").path))

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unlabelled_data_trains_on_soft_targets(teacher_ts, digits, write_npz, tmp_path):
    x, _ = digits
    ds = write_npz("unlabelled", x=x)
    result = run(make_spec(step__epochs=30), teacher_ts, ds, tmp_path, RecordingReporter(), device="cpu", threads=1)
    assert "accuracy" not in result.metrics["student"] and result.metrics["teacher"] == {}
    assert result.metrics["student"]["agreement"] >= 0.85
    assert "accuracy" not in result.report["student"] and "accuracy" not in result.report["teacher"]
    print(f"unlabelled agreement {result.metrics['student']['agreement']:.4f}")


def test_cancel_takes_effect_within_a_batch(teacher_ts, digits_npz, tmp_path):
    reporter = RecordingReporter(stop_after=20)
    with pytest.raises(Cancelled) as err:
        run(make_spec(), teacher_ts, digits_npz, tmp_path, reporter, device="cpu", threads=1)
    assert err.value.code == "cancelled"
    assert reporter.polls == 21  # stopped on the very first poll that said so
    assert "export" not in reporter.event_types()


@pytest.mark.plots
def test_explicit_held_out_images_multi_step_and_partial_exports(digits, tmp_path, write_npz, teacher_module):
    """N x 8 x 8 inputs (student flattens), x_val/y_val given, two distill steps, one export."""
    x, y = digits

    class Flat(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner(images.flatten(1))

    path = tmp_path / "image_teacher.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Flat(teacher_module)), str(path))
    from engine import TeacherSource

    images = x.reshape(-1, 8, 8)
    ds = write_npz("images", x=images[:1500], y=y[:1500], x_val=images[1500:], y_val=y[1500:])
    spec = make_spec(exports=["safetensors"], step__epochs=8)
    spec["steps"].append({"kind": "distill", "loss": {"type": "kd", "temperature": 2.0, "alpha": 0.5}, "epochs": 4,
                          "batch_size": 64, "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9}})
    reporter = RecordingReporter()
    result = run(spec, TeacherSource(path, "torchscript"), ds, tmp_path / "out", reporter, device="cpu", threads=1)
    assert result.report["data"] == {**result.report["data"], "train_rows": 1500, "val_rows": 297, "val_source": "x_val"}
    assert [s["index"] for s in result.report["steps"]] == [0, 1]
    assert [p["fraction"] for p in reporter.progresses][-1] == 1.0 and len(reporter.progresses) == 2 + 12
    assert [(p["step_index"], p["epoch"]) for p in reporter.progresses if p["epoch"] == 0] == [(0, 0), (1, 0)]
    assert {m["step"] for m in reporter.metrics} == {0, 1}
    assert {(a.kind, a.format, a.step_index) for a in result.artifacts} == {
        ("student", "safetensors", 0), ("architecture", "json", 0),
        ("student", "safetensors", 1), ("architecture", "json", 1), ("report", "json", None),
        ("model_card", "markdown", None), ("plot", "png", None)}
    student = load_safetensors_student(_artifact(result, "student", "safetensors").path).eval()
    with torch.no_grad():
        pred = student(torch.from_numpy(images[1500:])).argmax(1).numpy()
    assert float((pred == y[1500:]).mean()) == pytest.approx(result.metrics["student"]["accuracy"])
    assert result.metrics["student"]["accuracy"] >= 0.85


@pytest.mark.plots
def test_onnx_teacher_with_pinned_batch_and_no_exports(teacher_module, digits, write_npz, tmp_path):
    """Some ONNX exports fix the batch dimension to 1; the engine runs them row by row."""
    from engine import TeacherSource

    path = tmp_path / "batch1.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(teacher_module, (torch.zeros(1, 64),), str(path), dynamo=False,
                          input_names=["pixels"], output_names=["scores"], opset_version=17)
    x, y = digits
    ds = write_npz("small", x=x[:300], y=y[:300])
    result = run(make_spec(step__epochs=2), TeacherSource(path, "onnx"), ds, tmp_path / "out",
                 RecordingReporter(), device="cpu", threads=1)
    assert sorted(a.kind for a in result.artifacts) == ["model_card", "plot", "plot", "report"]
    assert result.report["teacher"]["num_parameters"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert result.metrics["teacher"]["accuracy"] >= 0.95
    assert result.report["student"]["size_bytes"] > 0
