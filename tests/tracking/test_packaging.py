"""What the worker sends MLflow, without a server: the registered model directory and the names it uses."""

from __future__ import annotations

import numpy as np
import pytest

from engine.values import ArtifactFile
from worker.tracking import model, names

REPORT = {"data": {"task": "classification", "inputs": {"x": [64]}, "output_width": 10}}


# mlflow.pytorch loads the archive with torch.load, which hands a TorchScript zip to torch.jit.load with this note.
@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file that looks like a TorchScript archive")
def test_a_torchscript_only_student_is_a_pytorch_flavour_model_that_loads_and_predicts(tmp_path):
    import mlflow.pytorch
    import mlflow.pyfunc
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(64, 10)).eval()
    torch.jit.save(torch.jit.script(net), str(tmp_path / "student.pt"))
    arts = [ArtifactFile("student", "safetensors", tmp_path / "s.safetensors", 0, ""),
            ArtifactFile("student", "torchscript", tmp_path / "student.pt", 0, "")]
    student = model.final_student(arts)
    assert student is arts[1]
    facts = model.model_facts(REPORT, {"x": {"shape": [100, 64], "dtype": "float64"}})
    assert (facts.dtypes, facts.output_name, facts.output_width) == ({"x": "float32"}, "logits", 10)
    assert model.write_model(student, facts, tmp_path / "mlmodel", run_id="r1") == "pytorch"
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    loaded = mlflow.pytorch.load_model(str(tmp_path / "mlmodel"))
    with torch.no_grad():
        assert torch.allclose(loaded(torch.from_numpy(x)), net(torch.from_numpy(x)))
    served = mlflow.pyfunc.load_model(str(tmp_path / "mlmodel"))
    assert str(served.metadata.signature.outputs) == "['logits': Tensor('float32', (-1, 10))]"
    assert np.allclose(np.asarray(served.predict(x)), net(torch.from_numpy(x)).detach().numpy(), atol=1e-6)


def test_the_last_steps_onnx_student_is_registered_before_its_torchscript():
    arts = [ArtifactFile("student", "onnx", "a", 0, ""), ArtifactFile("student", "torchscript", "b", 1, ""),
            ArtifactFile("student", "onnx", "c", 1, ""), ArtifactFile("report", "json", "r", None, "")]
    assert model.final_student(arts).path == "c"
    assert model.final_student(arts[3:]) is None


def test_integer_inputs_keep_int64_in_the_signature():
    report = {"data": {"task": "embedding", "inputs": {"input_ids": [16], "attention_mask": [16]}, "output_width": 8}}
    facts = model.model_facts(report, {"input_ids": {"dtype": "int32"}, "attention_mask": {"dtype": "int64"}})
    assert facts.dtypes == {"input_ids": "int64", "attention_mask": "int64"} and facts.output_name == "output"
    assert str(model.signature(facts).inputs) == ("['input_ids': Tensor('int64', (-1, 16)), "
                                                  "'attention_mask': Tensor('int64', (-1, 16))]")


def test_the_spec_becomes_params_mlflow_accepts():
    from mlflow.utils.validation import _validate_param

    spec = {"student": {"family": "mlp", "hidden": [64, 32]}, "steps": [{"kind": "distill", "loss": {"type": "kd"}}],
            "dataset_id": None, "metadata": {"team/../x": "search", "a" * 300: 1, "": True}, "baseline": False}
    params = names.params(spec)
    assert params["student.hidden"] == "[64, 32]" and params["steps.0.loss.type"] == "kd"
    assert params["dataset_id"] == "null" and params["baseline"] == "false"
    for k, v in params.items():
        _validate_param(k, v)  # raises on a key MLflow would refuse
    assert names.metric_key(0, "val_accuracy") == "val_accuracy"
    assert names.metric_key(2, "../train loss!") == "step2/_.._train loss_"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "0.5", None])
def test_only_finite_numbers_become_final_metrics(value):
    assert names.numbers({"v": value, "ok": 1}, "student") == {"student.ok": 1.0}
