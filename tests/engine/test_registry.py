"""Registries map a spec name to its implementation; the implementation's ``Config`` is the spec's model,
and the stored spec is validated by the spec's models (one definition, the API's)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

import jobspec
from engine import EngineError, registries
from engine.pipeline.job import plan_job
from engine.registry import Registry

from .helpers import make_spec


def test_public_registries_hold_builtins():
    assert set(registries) == {"losses", "students", "optimizers", "steps", "teacher_formats", "dataset_formats", "exports"}
    assert registries["losses"].names() == sorted(jobspec.LOSSES)
    assert registries["students"].names() == sorted(jobspec.STUDENT_FAMILIES)
    assert registries["optimizers"].names() == sorted(jobspec.OPTIMIZERS)
    assert registries["steps"].names() == sorted(jobspec.STEP_KINDS)
    assert registries["teacher_formats"].names() == ["hf_transformers", "onnx", "safetensors", "torch_export",
                                                      "torchscript"]
    assert registries["dataset_formats"].names() == ["csv", "image_folder", "jsonl", "npz", "parquet", "pt"]
    assert registries["exports"].names() == sorted(jobspec.base.ALL_EXPORT_FORMATS)


def test_every_component_config_is_the_specs_model():
    for name, config in jobspec.LOSSES.items():
        assert registries["losses"].get(name).Config is config
    for name, config in jobspec.STUDENT_FAMILIES.items():
        assert registries["students"].get(name).Config is config
    for name, config in jobspec.STEP_KINDS.items():
        assert registries["steps"].get(name).Config is config


def test_build_hands_the_validated_config_to_the_implementation():
    loss = registries["losses"].build(jobspec.KDLoss(temperature=2))
    assert loss.config == jobspec.KDLoss(temperature=2.0) and loss.name == "kd"
    student = registries["students"].build(jobspec.MLPStudent(hidden=[16, 8]))
    assert student.config.hidden == [16, 8] and student.config.activation == "relu"


def test_registering_a_config_that_is_not_the_specs_fails():
    class Other(BaseModel):
        type: str = "kd"

    reg: Registry = Registry("loss", key="type", configs=jobspec.LOSSES)
    with pytest.raises(TypeError, match="must be the spec's KDLoss"):
        @reg.register("kd")
        class KD:  # noqa: F841
            Config = Other
    with pytest.raises(ValueError, match="not in the job spec"):
        @reg.register("focal")
        class Focal:  # noqa: F841
            Config = jobspec.KDLoss
    with pytest.raises(ValueError):
        reg.register("BigWidget")
    with pytest.raises(EngineError) as err:
        reg.get("small_widget")
    assert err.value.code == "invalid_spec"


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"step__loss": {"type": "kd", "temp": 1.0}}, "steps[0].distill.loss.kd.temp: Extra inputs are not permitted"),
        ({"step__optimizer": {"type": "sgd", "nesterov": True}}, "steps[0].distill.optimizer.nesterov"),
        ({"step__shuffle": True}, "steps[0].distill.shuffle: Extra inputs are not permitted"),
        ({"step__loss": {"type": "kd", "temperature": 0}}, "temperature: Value error, temperature must be > 0"),
        ({"steps": []}, "steps: List should have at least 1 item"),
        ({"exports": ["torchscript", "tflite"]}, "exports[1]"),
        ({"val_fraction": 1.0}, "val_fraction: Input should be less than 1"),
        ({"val_fraction": 0.0}, "val_fraction: Input should be greater than 0"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"seed": 2**31}, "seed: Input should be less than or equal to 2147483647"),
        ({"exports": ["onnx", "onnx"]}, "exports lists a format twice"),
        ({"owner": "x"}, "owner: Extra inputs are not permitted"),
    ],
)
def test_plan_job_rejects_what_the_api_rejects_with_the_path(overrides, fragment):
    with pytest.raises(EngineError) as err:
        plan_job(make_spec(**overrides))
    assert err.value.code == "invalid_spec"
    assert fragment in err.value.message, err.value.message


def test_plan_job_builds_steps_and_student():
    job = plan_job(make_spec(metadata={"owner": "x"}))
    assert job.steps[0].method == "kd" and job.steps[0].epochs == 25
    assert job.seed == 0 and job.val_fraction == 0.1
    assert job.student.name == "mlp" and job.uploaded_student is None
    uploaded = plan_job(make_spec(student={"model_id": "mdl_1"}))
    assert uploaded.uploaded_student == jobspec.UploadedStudent(model_id="mdl_1")
