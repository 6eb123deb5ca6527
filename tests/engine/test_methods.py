"""Training-loop features end to end on digits: defaults, hints, schedules, early stopping, caching,
augmentation, baseline, regimes, coreset, data-free."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from engine import EngineError
from engine import run
from engine.training.optim import ScheduleConfig, lr_factor

from .helpers import RecordingReporter, make_spec


def _run(spec, teacher, data, tmp_path, reporter=None, **kw):
    return run(spec, teacher, data, tmp_path / "out", reporter or RecordingReporter(), device="cpu", threads=1, **kw)


@pytest.mark.slow  # trains a whole job to an accuracy floor
def test_defaults_only_job_reaches_090(teacher_ts, digits_npz, tmp_path):
    from jobspec import JobSpec

    spec = JobSpec.model_validate({"teacher_model_id": "m", "dataset_id": "d", "student": {"family": "mlp"},
                                   "exports": ["onnx"]}).model_dump(mode="json")
    result = _run(spec, teacher_ts, {"d": digits_npz}, tmp_path)
    assert result.metrics["student"]["accuracy"] >= 0.9, result.metrics


@pytest.mark.slow  # trains a whole job to an accuracy floor
def test_kd_with_hints_reaches_088(teacher_ts, digits_npz, tmp_path):
    spec = make_spec(exports=["onnx"], step__epochs=20,
                     step__hints=[{"teacher": "penultimate", "student": "penultimate", "weight": 0.5, "distance": "mse"},
                                  {"teacher": "2", "student": "1", "weight": 0.1, "distance": "cosine"}])
    result = _run(spec, teacher_ts, digits_npz, tmp_path)
    assert result.metrics["student"]["accuracy"] >= 0.88, result.metrics
    # adapters are not part of the exported student
    assert result.report["student"]["num_parameters"] == 64 * 32 + 32 + 32 * 10 + 10

    bad = make_spec(exports=["onnx"], step__hints=[{"teacher": "penultimate", "student": "nope", "weight": 1.0,
                                                    "distance": "mse"}])
    with pytest.raises(EngineError) as err:
        _run(bad, teacher_ts, digits_npz, tmp_path)
    assert err.value.code == "invalid_spec" and "'nope'" in err.value.message and "penultimate" in err.value.message


def test_hints_with_onnx_and_torch_export_teachers(teacher_onnx, digits_npz, tmp_path, teacher_module):
    spec = make_spec(exports=["onnx"], step__epochs=10,
                     step__hints=[{"teacher": "penultimate", "student": "penultimate", "weight": 0.5, "distance": "mse"}])
    result = _run(spec, teacher_onnx, digits_npz, tmp_path)
    assert result.metrics["student"]["accuracy"] >= 0.85


def test_schedules_change_lr_as_expected():
    cos = ScheduleConfig(type="cosine", warmup_fraction=0.0)
    assert lr_factor(cos, 0, 100) == pytest.approx(1.0)
    assert lr_factor(cos, 50, 100) == pytest.approx(0.5)
    assert lr_factor(cos, 99, 100) < 0.01
    const = ScheduleConfig(type="constant", warmup_fraction=0.2)
    assert lr_factor(const, 0, 100) < 0.1 and lr_factor(const, 19, 100) < 1.0 and lr_factor(const, 50, 100) == 1.0
    oc = ScheduleConfig(type="one_cycle", warmup_fraction=0.0)
    peak = max(range(100), key=lambda s: lr_factor(oc, s, 100))
    assert 25 <= peak <= 35 and lr_factor(oc, 0, 100) < 0.1 and lr_factor(oc, 99, 100) < 0.01


def test_schedule_is_applied_per_batch(teacher_ts, digits_npz, tmp_path):
    reporter = RecordingReporter()
    spec = make_spec(step__epochs=4,
                     step__schedule={"type": "cosine", "warmup_fraction": 0.0},
                     step__optimizer={"type": "sgd", "lr": 0.1, "weight_decay": 0.0, "momentum": 0.9})
    result = _run(spec, teacher_ts, digits_npz, tmp_path, reporter)
    # the lr is logged per epoch (last batch): strictly decreasing under cosine
    assert result.metrics["student"]["accuracy"] > 0.5


def test_early_stopping_restores_best(teacher_ts, digits_npz, tmp_path):
    reporter = RecordingReporter()
    # a huge constant lr makes later epochs worse than the best one
    spec = make_spec(step__epochs=30,
                     step__optimizer={"type": "sgd", "lr": 2.0, "weight_decay": 0.0, "momentum": 0.9},
                     step__schedule={"type": "constant", "warmup_fraction": 0.0},
                     step__early_stopping={"patience": 3, "metric": "accuracy", "min_delta": 0.0})
    try:
        result = _run(spec, teacher_ts, digits_npz, tmp_path, reporter)
    except EngineError as exc:  # diverged: acceptable only as a clear error
        assert exc.code == "training_diverged" and "diverged" in exc.message
        return
    accs = [m["value"] for m in reporter.metrics if m["name"] == "val_accuracy"]
    es = result.report["steps"][0]["early_stopping"]
    assert es["best_value"] == pytest.approx(max(accs))
    assert result.metrics["student"]["accuracy"] == pytest.approx(max(accs))
    assert any(e[0] == "early_stopping" for e in reporter.events)


class _Counter:
    def __init__(self, monkeypatch):
        from engine.teachers.torch_modules import TorchTeacher

        self.rows = 0
        self.calls = 0
        original = TorchTeacher._forward

        def counting(teacher, batch):
            self.calls += 1
            self.rows += int(next(iter(batch.values())).shape[0])
            return original(teacher, batch)

        monkeypatch.setattr(TorchTeacher, "_forward", counting)


def test_teacher_runs_once_per_example_without_augment(teacher_ts, digits, digits_npz, tmp_path, monkeypatch):
    counter = _Counter(monkeypatch)
    _run(make_spec(step__epochs=5), teacher_ts, digits_npz, tmp_path)
    n = len(digits[0])
    assert counter.rows == n + 2  # every row once (train + held-out) plus the 2-row probe


def test_teacher_runs_per_batch_with_augment(teacher_ts, digits, digits_npz, tmp_path, monkeypatch):
    counter = _Counter(monkeypatch)
    spec = make_spec(step__epochs=3, step__batch_size=128,
                     step__augment={"flip": False, "shift": 0, "noise": 0.05, "mixup": 0.2})
    result = _run(spec, teacher_ts, digits_npz, tmp_path)
    n = len(digits[0])
    n_val = round(n * 0.1)
    batches = -(-(n - n_val) // 128)
    assert counter.rows == 2 + n_val + 3 * (n - n_val)
    assert counter.calls == 1 + 1 + 3 * batches
    assert result.metrics["student"]["accuracy"] >= 0.6  # 3 epochs of mixup


def test_baseline_in_report(teacher_ts, digits_npz, tmp_path):
    spec = make_spec(step__epochs=10, baseline=True)
    result = _run(spec, teacher_ts, digits_npz, tmp_path)
    rep = result.report
    assert "baseline" in rep and rep["baseline"]["num_parameters"] == rep["student"]["num_parameters"]
    assert rep["teacher_gain"]["accuracy"] == pytest.approx(rep["student"]["accuracy"] - rep["baseline"]["accuracy"])
    assert result.metrics["baseline"]["accuracy"] > 0.5


def test_baseline_needs_labels(teacher_ts, digits, write_npz, tmp_path):
    data = write_npz("unlabelled", x=digits[0])
    with pytest.raises(EngineError) as err:
        _run(make_spec(baseline=True), teacher_ts, data, tmp_path)
    assert err.value.code == "invalid_spec" and "baseline" in err.value.message


def test_two_step_regime_with_transfer_then_labelled_data(teacher_ts, digits, write_npz, tmp_path):
    x, y = digits
    transfer = write_npz("transfer", x=x[:1000])
    labelled = write_npz("labelled", x=x[1000:], y=y[1000:])
    step0 = {**make_spec()["steps"][0], "epochs": 10, "dataset_id": "transfer"}
    step1 = {**make_spec()["steps"][0], "epochs": 10, "loss": {"type": "kd", "temperature": 4.0, "alpha": 0.5}}
    spec = make_spec(dataset_id="labelled", steps=[step0, step1], exports=["onnx", "torchscript", "safetensors"])
    result = _run(spec, teacher_ts, {"labelled": labelled, "transfer": transfer}, tmp_path)
    assert [s["data"]["dataset"] for s in result.report["steps"]] == ["transfer", "labelled"]
    assert result.report["steps"][0]["data"]["rows"] == 1000
    assert result.metrics["student"]["accuracy"] >= 0.85


def test_coreset_kmeans_and_random(teacher_ts, digits_npz, tmp_path):
    for method in ("kmeans", "random"):
        spec = make_spec(step__epochs=25, step__coreset={"method": method, "fraction": 0.3})
        result = _run(spec, teacher_ts, digits_npz, tmp_path / method)
        cs = result.report["steps"][0]["data"]["coreset"]
        assert cs["method"] == method and cs["rows_total"] == 1797 - 180
        assert cs["rows_used"] == round(cs["rows_total"] * 0.3)
        assert result.metrics["student"]["accuracy"] >= 0.8, (method, result.metrics)


def test_kmeans_is_deterministic():
    from engine.data.plan import kmeans_representatives

    pts = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    a, b = kmeans_representatives(pts, 30, 1), kmeans_representatives(pts, 30, 1)
    assert np.array_equal(a, b) and len(a) == 30 and len(set(a.tolist())) == 30


@pytest.mark.slow  # trains a whole job to an accuracy floor
def test_data_free_on_digits(teacher_ts, digits, write_npz, tmp_path):
    x, y = digits
    held = write_npz("heldout", x=x[1400:], y=y[1400:])
    spec = make_spec(dataset_id=None, eval_dataset_id="heldout", input_spec={"shape": [64], "range": [0.0, 1.0]},
                     exports=[],
                     step__synthesize={"method": "generator", "num_samples": 4000, "generator_epochs": 30,
                                       "latent_dim": 32},
                     step__epochs=30, step__batch_size=128)
    result = _run(spec, teacher_ts, {"heldout": held}, tmp_path)
    assert result.report["data"]["val_source"] == "eval_dataset"
    assert result.report["steps"][0]["data"]["synthetic"] is True
    assert result.metrics["student"]["accuracy"] >= 0.5, result.metrics


def test_data_free_needs_torch_teacher(teacher_onnx, tmp_path):
    spec = make_spec(dataset_id=None, input_spec={"shape": [64], "range": [0.0, 1.0]},
                     step__synthesize={"method": "generator", "num_samples": 256, "generator_epochs": 1,
                                       "latent_dim": 8})
    with pytest.raises(EngineError) as err:
        _run(spec, teacher_onnx, None, tmp_path)
    assert err.value.code == "invalid_spec" and "needs a torch teacher" in err.value.message
