"""Compression jobs end to end: prune / quantize steps on the teacher itself or after distillation,
quality gates, input reduction, per-step exports that reload in plain torch / onnxruntime.

Teachers are trained here (compression_fixtures: a 64-1200-1200-10 MLP and a small CNN on digits);
the held-out split is the fixtures' test split, passed as x_val / y_val.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from engine import DatasetSource
from engine import EngineError
from engine import QualityGateFailed
from engine import TeacherSource
from engine import run

from .compression_fixtures import _cnn, _split, _teacher
from .helpers import RecordingReporter

pytestmark = pytest.mark.slow  # whole prune/quantize jobs held to accuracy floors

torch.set_num_threads(1)
BASE = {"teacher_model_id": "mdl_teacher", "dataset_id": "ds_digits", "val_fraction": 0.1, "seed": 0,
        "metadata": {}, "exports": ["torchscript", "onnx", "safetensors"]}
FT = {"epochs": 3, "loss": {"type": "kd", "temperature": 2.0, "alpha": 0.5}, "batch_size": 64,
      "optimizer": {"type": "adam", "lr": 5e-4}}


def _save_ts(module: nn.Module, path, example: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))


@pytest.fixture(scope="module")
def digits_split():
    xtr, ytr, xte, yte = (t.numpy() for t in _split())
    return xtr, ytr, xte, yte


@pytest.fixture(scope="module")
def mlp_job(tmp_path_factory, digits_split):
    """(TeacherSource of the 2x1200 MLP as TorchScript, DatasetSource with x_val/y_val, teacher test accuracy)."""
    d = tmp_path_factory.mktemp("mlp")
    xtr, ytr, xte, yte = digits_split
    teacher = _teacher()
    _save_ts(teacher, d / "teacher.pt", torch.from_numpy(xtr[:2]))
    np.savez(d / "digits.npz", x=xtr, y=ytr, x_val=xte, y_val=yte)
    with torch.no_grad():
        acc = float((teacher(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    return TeacherSource(d / "teacher.pt", "torchscript"), DatasetSource(d / "digits.npz"), acc


@pytest.fixture(scope="module")
def cnn_job(tmp_path_factory, digits_split):
    d = tmp_path_factory.mktemp("cnn")
    xtr, ytr, xte, yte = digits_split
    cnn = _cnn()
    _save_ts(cnn, d / "cnn.pt", torch.from_numpy(xtr[:2]).view(-1, 1, 8, 8))
    np.savez(d / "digits_img.npz", x=xtr.reshape(-1, 1, 8, 8), y=ytr, x_val=xte.reshape(-1, 1, 8, 8), y_val=yte)
    with torch.no_grad():
        acc = float((cnn(torch.from_numpy(xte).view(-1, 1, 8, 8)).argmax(1).numpy() == yte).mean())
    return TeacherSource(d / "cnn.pt", "torchscript"), DatasetSource(d / "digits_img.npz"), acc


def _run(spec_extra, job, tmp_path, name="out"):
    teacher, data, _ = job
    spec = {**copy.deepcopy(BASE), **spec_extra}
    reporter = RecordingReporter()
    result = run(spec, teacher, data, tmp_path / name, reporter, device="cpu", threads=1)
    return result, reporter


def _files(result, step):
    return {a.format: a.path for a in result.artifacts if a.kind == "student" and a.step_index == step}


def _load_ts(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu")


def _onnx_predict(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _check_exports(result, x_val, y_val):
    """Every student export reloads in plain torch / onnxruntime and scores what the report says."""
    rows = {r["index"]: r for r in result.report["steps"]}
    steps = sorted({a.step_index for a in result.artifacts if a.kind == "student"})
    assert steps, result.artifacts
    for step in steps:
        row = rows[step]
        for fmt, path in _files(result, step).items():
            if fmt == "torchscript":
                with torch.inference_mode():
                    pred = _load_ts(path)(torch.from_numpy(x_val)).argmax(1).numpy()
                assert float((pred == y_val).mean()) == pytest.approx(row["accuracy"], abs=1e-9), (step, fmt)
            elif fmt == "onnx":
                pred = _onnx_predict(path, x_val).argmax(1)
                acc = float((pred == y_val).mean())
                assert acc == pytest.approx(row["exports"]["onnx"]["accuracy"], abs=1e-9), (step, fmt)
                assert abs(acc - row["accuracy"]) <= 0.011, (step, acc, row["accuracy"])
            elif fmt == "safetensors":
                from engine.export.formats import load_safetensors_student

                try:
                    model = load_safetensors_student(path).eval()
                except EngineError:
                    continue  # not a rebuildable family: verified against the module at export
                with torch.inference_mode():
                    pred = model(torch.from_numpy(x_val)).argmax(1).numpy()
                assert float((pred == y_val).mean()) == pytest.approx(row["accuracy"], abs=0.006), (step, fmt)


def _linear_zero_fraction(module) -> float:
    weights = [t for k, t in module.state_dict().items() if k.endswith("weight") and t.dim() == 2]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


ROW_KEYS = {"num_parameters", "nonzero_parameters", "size_bytes", "size_gzip_bytes", "latency_ms", "accuracy",
            "agreement", "f1_macro"}


@pytest.mark.plots
def test_magnitude_prune_of_the_teacher_delivers_real_zeros(mlp_job, digits_split, tmp_path):
    _, _, xte, yte = digits_split
    result, reporter = _run({"steps": [{"kind": "prune", "method": "magnitude", "amount": 0.8, "scope": "global",
                                        "finetune": FT}]}, mlp_job, tmp_path)
    (row,) = result.report["steps"]
    assert ROW_KEYS <= set(row) and row["prune"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    ts = _load_ts(_files(result, 0)["torchscript"])
    assert _linear_zero_fraction(ts) >= 0.75
    assert not any("mask" in k or "orig" in k for k in ts.state_dict())
    assert row["accuracy"] >= mlp_job[2] - 0.02, (row["accuracy"], mlp_job[2])
    assert row["nonzero_parameters"] < 0.25 * row["num_parameters"]
    assert row["size_gzip_bytes"] < 0.5 * row["size_bytes"]
    _check_exports(result, xte, yte)
    assert any(e[0] == "prune" for e in reporter.events)
    # the fine-tune epochs are metrics of step 0
    assert {m["epoch"] for m in reporter.metrics if m["step"] == 0} == {1, 2, 3}
    kinds = sorted(a.kind for a in result.artifacts)
    assert kinds.count("plot") == 2 and "model_card" in kinds
    card = next(a.path for a in result.artifacts if a.kind == "model_card").read_text()
    assert "prune" in card and result.report["reproducibility"]["teacher_sha256"] in card


def test_channel_prune_shrinks_the_teacher(mlp_job, digits_split, tmp_path):
    _, _, xte, yte = digits_split
    result, _ = _run({"steps": [{"kind": "prune", "method": "channel", "amount": 0.5, "iterations": 2,
                                 "finetune": {**FT, "epochs": 2}}]}, mlp_job, tmp_path)
    (row,) = result.report["steps"]
    assert row["num_parameters"] <= 0.6 * result.report["teacher"]["num_parameters"]
    assert row["accuracy"] >= mlp_job[2] - 0.02
    assert [r["iteration"] for r in row["prune"]["rounds"]] == [1, 2]
    assert result.report["architecture"]["family"] == "sequential"
    _check_exports(result, xte, yte)


def test_dynamic_int8_and_onnx_int8_shrink_the_teacher(mlp_job, digits_split, tmp_path):
    _, _, xte, yte = digits_split
    teacher_size = mlp_job[0].path.stat().st_size
    result, reporter = _run({"steps": [{"kind": "quantize", "method": "dynamic_int8"}]}, mlp_job, tmp_path, "dyn")
    (row,) = result.report["steps"]
    files = _files(result, 0)
    assert set(files) == {"torchscript", "onnx"}  # safetensors skipped (packed int8 weights)
    assert any(e[0] == "export" and (e[3] or {}).get("skipped") for e in reporter.events)
    assert files["torchscript"].stat().st_size <= 0.35 * teacher_size
    assert row["accuracy"] >= mlp_job[2] - 0.01
    assert "dynamic" in row["quantization"]["export_notes"]["onnx"]
    _check_exports(result, xte, yte)

    result, _ = _run({"steps": [{"kind": "quantize", "method": "onnx_int8", "mode": "dynamic"}]}, mlp_job, tmp_path,
                     "onnx")
    (row,) = result.report["steps"]
    files = _files(result, 0)
    assert set(files) == {"onnx"}
    assert files["onnx"].stat().st_size <= 0.35 * teacher_size
    assert row["size_bytes"] == files["onnx"].stat().st_size
    acc = float((_onnx_predict(files["onnx"], xte).argmax(1) == yte).mean())
    assert acc == pytest.approx(row["accuracy"]) and acc >= mlp_job[2] - 0.01


def test_static_int8_on_the_cnn(cnn_job, digits_split, tmp_path):
    _, _, xte, yte = digits_split
    result, _ = _run({"steps": [{"kind": "quantize", "method": "static_int8", "calibration_rows": 256}]}, cnn_job,
                     tmp_path)
    (row,) = result.report["steps"]
    assert row["accuracy"] >= cnn_job[2] - 0.03
    assert row["data"]["calibration_rows"] == 256
    assert row["size_bytes"] < 0.5 * result.report["teacher"]["size_bytes"]
    _check_exports(result, xte.reshape(-1, 1, 8, 8), yte)


def test_distill_prune_quantize_pipeline_with_gates(mlp_job, digits_split, tmp_path):
    _, _, xte, yte = digits_split
    distill = {"kind": "distill", "epochs": 12, "batch_size": 64, "optimizer": {"type": "adamw", "lr": 0.003},
               "gate": {"metric": "accuracy", "max_drop": 0.05}}
    steps = [distill,
             {"kind": "prune", "method": "magnitude", "amount": 0.5, "finetune": FT,
              "gate": {"metric": "agreement", "max_drop": 0.06}},
             {"kind": "quantize", "method": "dynamic_int8", "gate": {"metric": "accuracy", "max_drop": 0.06}}]
    result, _ = _run({"student": {"family": "mlp", "hidden": [128]}, "steps": steps}, mlp_job, tmp_path, "ok")
    rows = result.report["steps"]
    assert [r["kind"] for r in rows] == ["distill", "prune", "quantize"]
    assert all(r["gate"]["passed"] for r in rows)
    assert {a.step_index for a in result.artifacts if a.kind == "student"} == {0, 1, 2}
    assert result.report["student"]["accuracy"] == rows[2]["accuracy"]
    _check_exports(result, xte, yte)

    steps[1] = {"kind": "prune", "method": "random", "amount": 0.9, "gate": {"metric": "accuracy", "max_drop": 0.0}}
    with pytest.raises(QualityGateFailed) as err:
        _run({"student": {"family": "mlp", "hidden": [128]}, "steps": steps}, mlp_job, tmp_path, "fail")
    exc = err.value
    assert exc.code == "quality_gate"
    assert exc.message.startswith("step 1 (prune random): accuracy dropped ") and "(allowed 0.000)" in exc.message
    report = exc.result.report
    assert report["gate"]["failed_step"] == 1 and report["gate"]["metric"] == "accuracy"
    assert report["gate"]["drop"] > 0 and report["gate"]["max_drop"] == 0
    assert [r["kind"] for r in report["steps"]] == ["distill", "prune"]
    assert {a.step_index for a in exc.result.artifacts if a.kind == "student"} == {0}
    assert any(a.kind == "report" for a in exc.result.artifacts)
    saved = json.loads(next(a.path for a in exc.result.artifacts if a.kind == "report").read_text())
    assert saved["gate"] == report["gate"]
    _check_exports(exc.result, xte, yte)


def test_coreset_and_pca_input_reduction(mlp_job, digits_split, tmp_path):
    _, _, xte, yte = digits_split
    distill = {"kind": "distill", "epochs": 20, "batch_size": 32, "optimizer": {"type": "adamw", "lr": 0.01}}
    student = {"family": "mlp", "hidden": [64]}
    full, _ = _run({"student": student, "steps": [distill], "exports": []}, mlp_job, tmp_path, "full")
    # a quarter of the rows, about the same number of optimizer steps
    core, _ = _run({"student": student, "steps": [{**distill, "epochs": 80, "coreset": {"method": "kmeans",
                                                                                       "fraction": 0.25}}],
                    "exports": []}, mlp_job, tmp_path, "core")
    (crow,) = core.report["steps"]
    assert crow["data"]["coreset"]["rows_used"] == round(0.25 * 1347) and crow["data"]["rows"] == 337
    assert crow["accuracy"] >= full.report["steps"][0]["accuracy"] - 0.04

    result, _ = _run({"student": student, "steps": [{**distill, "input_reduction": {"method": "pca",
                                                                                   "components": 16}}]},
                     mlp_job, tmp_path, "pca")
    (row,) = result.report["steps"]
    assert row["input_reduction"]["components"] == 16 and row["input_reduction"]["in_features"] == 64
    assert result.report["architecture"]["family"] == "input_reduction"
    assert result.report["architecture"]["student"]["in_features"] == 16
    files = _files(result, 0)
    assert _onnx_predict(files["onnx"], xte).shape == (len(xte), 10)
    ts = _load_ts(files["torchscript"])
    assert ts(torch.from_numpy(xte)).shape == (len(xte), 10)
    assert row["accuracy"] >= 0.85
    _check_exports(result, xte, yte)


def test_select_k_best_reduction_selects_features(mlp_job, digits_split, tmp_path):
    _, _, xte, yte = digits_split
    distill = {"kind": "distill", "epochs": 10, "batch_size": 64, "optimizer": {"type": "adamw", "lr": 0.003},
               "input_reduction": {"method": "select_k_best", "components": 24}}
    result, _ = _run({"student": {"family": "mlp", "hidden": [64]}, "steps": [distill], "exports": ["onnx"]},
                     mlp_job, tmp_path)
    info = result.report["steps"][0]["input_reduction"]
    assert len(info["selected"]) == 24 and info["scored_against"] == "labels"
    assert _onnx_predict(_files(result, 0)["onnx"], xte).shape == (len(xte), 10)


def test_onnx_teacher_quantizes_directly_and_refuses_pruning(mlp_job, digits_split, tmp_path):
    _, _, xte, yte = digits_split
    teacher = _teacher()
    path = tmp_path / "teacher.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(teacher, (torch.zeros(2, 64),), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17)
    job = (TeacherSource(path, "onnx"), mlp_job[1], mlp_job[2])
    result, _ = _run({"steps": [{"kind": "quantize", "method": "onnx_int8", "mode": "static",
                                 "calibration_rows": 128}]}, job, tmp_path, "q")
    (row,) = result.report["steps"]
    assert row["accuracy"] >= mlp_job[2] - 0.02
    assert _files(result, 0)["onnx"].stat().st_size <= 0.35 * path.stat().st_size
    with pytest.raises(EngineError) as err:
        _run({"steps": [{"kind": "prune", "method": "magnitude", "amount": 0.5}]}, job, tmp_path, "p")
    assert err.value.code == "unsupported" and "ONNX" in err.value.message


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 10)

    def forward(self, x):
        return self.b(x + torch.relu(self.a(x)))


def test_non_chain_torchscript_teacher_is_unsupported_for_pruning(mlp_job, tmp_path):
    path = tmp_path / "res.pt"
    _save_ts(_Residual().eval(), path, torch.zeros(2, 64))
    job = (TeacherSource(path, "torchscript"), mlp_job[1], 0.0)
    with pytest.raises(EngineError) as err:
        _run({"steps": [{"kind": "prune", "method": "magnitude", "amount": 0.5}]}, job, tmp_path)
    assert err.value.code == "unsupported" and "cannot be edited" in err.value.message


def test_fp16_and_qat(mlp_job, digits_split, tmp_path):
    _, _, xte, yte = digits_split
    distill = {"kind": "distill", "epochs": 8, "batch_size": 64, "optimizer": {"type": "adamw", "lr": 0.003}}
    student = {"family": "mlp", "hidden": [64]}
    result, _ = _run({"student": student, "steps": [distill, {"kind": "quantize", "method": "fp16"}]}, mlp_job,
                     tmp_path, "fp16")
    rows = result.report["steps"]
    assert set(_files(result, 1)) == {"torchscript", "onnx", "safetensors"}
    assert abs(rows[1]["accuracy"] - rows[0]["accuracy"]) <= 0.01
    _check_exports(result, xte, yte)
    result, _ = _run({"student": student, "steps": [distill, {"kind": "quantize", "method": "qat",
                                                              "finetune": {**FT, "epochs": 2}}]},
                     mlp_job, tmp_path, "qat")
    rows = result.report["steps"]
    assert rows[1]["accuracy"] >= rows[0]["accuracy"] - 0.03
    assert set(_files(result, 1)) == {"torchscript", "onnx"}
    _check_exports(result, xte, yte)
